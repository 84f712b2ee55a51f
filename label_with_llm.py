#!/usr/bin/env python
"""Whisper transcripts + LLM sentiment pseudo-labels (MERITS-L pre-training data), resumable.

    python label_with_llm.py (--audio DIR_OR_DATASET | --transcripts CSV) --out DIR \\
        --llm-url http://127.0.0.1:8000/v1 --llm-model NAME [--whisper-model NAME_OR_PATH]

See ``python label_with_llm.py --help`` and :mod:`merits.labelling.run`.
"""

import sys

from merits.labelling.run import main

if __name__ == "__main__":
    sys.exit(main())
