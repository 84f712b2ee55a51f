"""Trainers for every stage of MERITS-L and MiSTER-E (``train.py`` is a thin front end to :func:`main`)."""

from .arguments import ConfigError, StageArguments, TrainingArguments, parse_args
from .loop import Head, NonFiniteLossError, StagePlan, run_stage
from .stages import DataError, run_training


def main(argv=None) -> dict:
    """Parse ``argv`` (YAML config + ``--key value`` overrides) and run the training."""
    import sys

    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = run_training(args)
    from .loop import distributed_state

    distributed_state().wait_for_everyone()
    distributed_state().destroy_process_group()  # once, after every stage (DDP runs under torchrun)
    return results


__all__ = [
    "ConfigError",
    "DataError",
    "Head",
    "NonFiniteLossError",
    "StageArguments",
    "StagePlan",
    "TrainingArguments",
    "main",
    "parse_args",
    "run_stage",
    "run_training",
]
