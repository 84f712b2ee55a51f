"""Trainers for every stage of MERITS-L and MiSTER-E (``train.py`` is a thin front end to :func:`main`).

Names load lazily, so ``merits.training.arguments`` (and ``train.py --help``) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {
    "ConfigError": ".arguments",
    "StageArguments": ".arguments",
    "TrainingArguments": ".arguments",
    "parse_args": ".arguments",
    "Head": ".loop",
    "NonFiniteLossError": ".loop",
    "StagePlan": ".loop",
    "run_stage": ".loop",
    "DataError": ".stages",
    "run_training": ".stages",
}


def main(argv=None) -> dict:
    """Parse ``argv`` (YAML config + ``--key value`` overrides) and run the training."""
    import sys

    from .arguments import parse_args
    from .loop import distributed_state
    from .stages import run_training

    args = parse_args(sys.argv[1:] if argv is None else argv)
    from .. import register

    register()  # merits folders (stage 0 output, best/) resolve to the installed classes in this process
    results = run_training(args)
    distributed_state().wait_for_everyone()
    distributed_state().destroy_process_group()  # once, after every stage (DDP runs under torchrun)
    return results


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted([*_EXPORTS, "main"])
