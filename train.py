#!/usr/bin/env python
"""Train MERITS-L and/or MiSTER-E, every stage, with Accelerate.

    accelerate launch train.py                                   # demo corpus, both systems, all stages
    accelerate launch train.py --config configs/meld_merits-l.yaml --output_dir OUT
    accelerate launch train.py --architecture mister-e --train_features DIR --validation_features DIR --output_dir OUT
    torchrun --nproc_per_node 2 train.py ...                     # 2 CPU processes (gloo DDP)

Options: any key of merits/training/arguments.py as ``--key value`` (stage settings as
``--utterance.learning_rate 1e-5``); ``--resume`` continues a killed run.
"""

import errno
import sys

from merits.training import main
from merits.training.arguments import ConfigError, HelpRequested
from merits.training.checkpointing import OutputDirError
from merits.training.stages import DataError


if __name__ == "__main__":
    try:
        main()
    except HelpRequested as usage:
        print(usage)
        sys.exit(0)
    except (ConfigError, OutputDirError, DataError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("train.py: stopped; rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"train.py: error: no space left on the device ({error.filename or error}); free some space and rerun "
              "the same command with --resume (finished checkpoints are kept)", file=sys.stderr)
        sys.exit(2)
