#!/usr/bin/env python
"""Train MERITS-L and/or MiSTER-E, every stage, with Accelerate.

    accelerate launch train.py                                   # demo corpus, both systems, all stages
    accelerate launch train.py --config configs/meld_merits-l.yaml --output_dir OUT
    accelerate launch train.py --architecture mister-e --train_features DIR --validation_features DIR --output_dir OUT
    torchrun --nproc_per_node 2 train.py ...                     # 2 CPU processes (gloo DDP)

Options: any key of merits/training/arguments.py as ``--key value`` (stage settings as
``--utterance.learning_rate 1e-5``); ``--resume`` continues a killed run; ``--help`` lists them all with their
descriptions and defaults (without importing torch).
"""

import errno
import os
import signal
import sys


def _end_accelerate_launcher_quietly() -> None:
    """`accelerate launch` (one process) re-raises a failed script's stderr inside a traceback of its own, so a
    one-line error would be printed twice under ~25 lines of accelerate internals. After a user error (already
    explained on stderr) this ends that launcher with SIGTERM instead: it exits 143 and prints nothing more.
    Only the direct parent, only when it is `accelerate launch`, and never under torchrun (several processes)."""
    if os.environ.get("LOCAL_WORLD_SIZE", "1") not in ("", "1"):
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as reader:
            argv = [part.decode(errors="replace") for part in reader.read().split(b"\0") if part]
    except OSError:  # not Linux, or the parent is gone
        return
    names = [os.path.basename(part) for part in argv[:3]]
    launched = ("accelerate" in names or "accelerate.commands.launch" in argv[:3]) and "launch" in argv[:4]
    if launched or (argv[1:3] == ["-m", "accelerate.commands.launch"]):
        sys.stderr.flush()
        _wait_until_stderr_is_read()  # our stderr is the launcher's pipe: let it pass the message on first
        os.kill(os.getppid(), signal.SIGTERM)


def _wait_until_stderr_is_read(limit: float = 5.0) -> None:
    """Until the reader of our stderr pipe has taken everything written to it (FIONREAD), at most ``limit`` s."""
    import fcntl
    import struct
    import termios
    import time

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            pending = struct.unpack("i", fcntl.ioctl(2, termios.FIONREAD, b"\0\0\0\0"))[0]
        except OSError:
            break
        if pending == 0:
            break
        time.sleep(0.02)
    time.sleep(0.2)  # the launcher writes what it read to its own stderr


if __name__ == "__main__":
    if any(token in ("--help", "-h") for token in sys.argv[1:]):  # before any heavy import: answers in well under 2 s
        from merits.training.arguments import usage

        print(usage())
        sys.exit(0)

    from merits.training import main
    from merits.training.arguments import ConfigError, HelpRequested
    from merits.training.checkpointing import OutputDirError
    from merits.training.stages import DataError

    try:
        main()
    except HelpRequested as usage_text:
        print(usage_text)
        sys.exit(0)
    except (ConfigError, OutputDirError, DataError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        _end_accelerate_launcher_quietly()
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
