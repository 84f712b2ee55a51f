"""Output-folder policy, ``accelerator.save_state`` / ``load_state`` resumption and per-stage results.

Layout of one system's run folder (``OUT`` for one architecture, ``OUT/<architecture>`` for "both"):

```
run_config.yaml                      the options of the run (what --resume must match)
checkpoints/<stage>/step_000200/     accelerator.save_state (model, optimizer, scheduler, RNG, TrainerState)
stages/<stage>/best_<head>.safetensors   weights of the modules selected on that head's best validation wF1
stages/<stage>/result.json           written when the stage is finished: its validation and test metrics
cache/                               embedding cache (stage I -> stages II/III, MoE)
logs/                                tensorboard
best/                                the selected model as a Hub folder
all_results.json
```

A stage with ``result.json`` is finished: a resumed run loads its selected weights and skips it. A stage
without it restarts from its newest checkpoint, which holds the model, the optimizer, the scheduler,
every process's RNG state and the :class:`TrainerState` (epoch, step, best metrics so far), so the
resumed run ends with the same weights and metrics as an unbroken one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml


RUN_CONFIG = "run_config.yaml"
#: input fingerprints of the run (merits.resume): a resumed run must read the same data
RESUME_MANIFEST = "resume_manifest.json"
TRAINER_STATE = "trainer_state.json"
# options that may differ between a run and its resumption
_RESUME_FREE_KEYS = {
    "resume",
    "overwrite_output_dir",
    "debug_exit_after_step",
    "push_to_hub",
    "hub_model_id",
    "report_to",
    "logging_steps",
    "config",
    "output_dir",
}


class OutputDirError(RuntimeError):
    """The output folder cannot be used for this run (it holds another run, or there is nothing to resume)."""


def _comparable(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in _RESUME_FREE_KEYS}


def _has_progress(output_dir: Path) -> bool:
    """Whether the folder holds anything a run made beyond its settings (a run that failed before its first
    result, e.g. on a bad option, leaves only ``run_config.yaml``: it must not block the corrected rerun)."""
    for child in output_dir.rglob("*"):
        if child.is_file() and child.relative_to(output_dir).as_posix() not in (RUN_CONFIG, RESUME_MANIFEST):
            return True
    return False


def prepare_output_dir(output_dir: str | Path, options: dict, resume: bool, overwrite: bool, is_main_process: bool,
                       barrier=None, inputs: dict | None = None) -> bool:
    """Apply the output-folder policy; returns True when an earlier run is being resumed.

    - empty or missing folder, or one holding only the settings of a run that stopped before making anything: a new
      run.
    - folder holding a run: ``resume`` continues it (its options must match), ``overwrite`` deletes it,
      otherwise :class:`OutputDirError`.
    - a non-empty folder that is not a merits run is never deleted.
    - ``inputs`` (``{option: fingerprint}`` of the data files, :func:`merits.resume.fingerprint_path`) are recorded
      in ``resume_manifest.json``; ``resume`` refuses when they changed (:class:`merits.resume.ResumeMismatch`).

    Every process calls this (the checks only read); only the main process writes or deletes. ``barrier``
    (e.g. ``PartialState().wait_for_everyone``) is called by every process after its checks and before the main
    process writes, so no process reads the folder the main process is writing into. Call it once more afterwards.
    """
    from merits.resume import ResumeMismatch, check_manifest, write_manifest

    output_dir = Path(output_dir)
    config_file = output_dir / RUN_CONFIG
    has_content = output_dir.is_dir() and any(output_dir.iterdir())
    if has_content and config_file.is_file() and not _has_progress(output_dir):
        has_content, resume = False, False  # a run that made nothing: start it again with the options given now
    if resume:
        if not config_file.is_file():
            if has_content:
                raise OutputDirError(f"{output_dir}: --resume given but the folder holds no merits run ({RUN_CONFIG} is missing)")
            resume = False  # nothing to resume: start the run
        else:
            previous = yaml.safe_load(config_file.read_text()) or {}
            old, new = _comparable(previous), _comparable(options)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
                raise OutputDirError(
                    f"{output_dir}: cannot resume, the options differ from the run in this folder ({detail}). "
                    "Resume with the same options, or start afresh with --overwrite_output_dir."
                )
            try:
                check_manifest(output_dir / RESUME_MANIFEST, "train.py", inputs or {}, {}, has_output=True,
                               what=str(output_dir),
                               restart_hint="resume with the same data, or start afresh with --overwrite_output_dir")
            except ResumeMismatch as error:
                raise OutputDirError(str(error)) from None
            if barrier is not None:
                barrier()
            return True
    if has_content:
        if not overwrite and config_file.is_file() and _comparable(yaml.safe_load(config_file.read_text()) or {}) == _comparable(options):
            finished = (output_dir / "all_results.json").is_file()
            raise OutputDirError(
                f"{output_dir} already holds another run of these same options, "
                + (f"finished (results: {output_dir / 'all_results.json'}, model: {output_dir / 'best'})" if finished
                   else "not finished")
                + ". Pass --resume to continue it" + (" (finished stages are reused)" if finished else "")
                + ", --overwrite_output_dir to train afresh, or choose another --output_dir."
            )
        if not overwrite:
            raise OutputDirError(
                f"{output_dir} already holds another run ({', '.join(sorted(p.name for p in output_dir.iterdir())[:5])}). "
                "Pass --resume to continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
            )
        if not config_file.is_file():
            raise OutputDirError(
                f"{output_dir} is not empty and is not a merits run ({RUN_CONFIG} is missing): refusing to delete it "
                "even with --overwrite_output_dir. Choose another --output_dir."
            )
    if barrier is not None:
        barrier()  # every process has checked the folder as it was; now the main process may change it
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if is_main_process:
            for child in output_dir.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    if is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(options, sort_keys=True))
        write_manifest(output_dir / RESUME_MANIFEST, "train.py", inputs or {}, {})
    return False


@dataclass
class TrainerState:
    """Where a stage's training loop stands; saved with every checkpoint (``register_for_checkpointing``)."""

    epoch: int = 0  # the epoch being run (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already consumed
    global_step: int = 0  # optimizer updates so far
    epochs_done: int = 0  # epochs whose validation has been run
    best: dict = field(default_factory=dict)  # head -> best validation weighted F1
    best_epoch: dict = field(default_factory=dict)  # head -> epoch of that best
    best_metrics: dict = field(default_factory=dict)  # head -> the validation metrics at that best
    bad_epochs: int = 0  # epochs without improvement (early stopping)
    history: list = field(default_factory=list)  # one dict per epoch: losses and validation wF1s

    def state_dict(self) -> dict:
        # json round trip: plain types only (torch.load(weights_only=True) accepts them)
        return {"json": json.dumps(asdict(self))}

    def load_state_dict(self, state: dict) -> None:
        values = json.loads(state["json"])
        for key, value in values.items():
            setattr(self, key, value)


_STEP_DIR = re.compile(r"^step_(\d+)$")


class StageCheckpoints:
    """Checkpoints and results of one stage in ``run_dir``."""

    def __init__(self, run_dir: str | Path, stage: str, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.stage = stage
        safe = stage.replace("+", "_")
        self.checkpoint_dir = self.run_dir / "checkpoints" / safe
        self.stage_dir = self.run_dir / "stages" / safe
        self.keep = keep

    # --- accelerate state ---------------------------------------------------------------------
    def latest(self) -> Path | None:
        if not self.checkpoint_dir.is_dir():
            return None
        steps = []
        for child in self.checkpoint_dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / "COMPLETE").is_file():
                steps.append((int(match.group(1)), child))
        return max(steps)[1] if steps else None

    def save(self, accelerator, global_step: int, trainer_state: "TrainerState | None" = None) -> Path:
        """``accelerator.save_state`` at ``step_<global_step>`` (+ ``trainer_state.json``), marked COMPLETE once every
        process has written. The trainer state is plain JSON, not an accelerate custom (pickled) checkpoint, so
        that resuming never unpickles (``torch.load(weights_only=False)``) a file of the output folder."""
        path = self.checkpoint_dir / f"step_{global_step:08d}"
        # accelerate creates the folder on the main process only, while every process writes its RNG state
        # into it: create it first, so that no rank can get there before it exists
        if accelerator.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if trainer_state is not None:
                (path / TRAINER_STATE).write_text(json.dumps(asdict(trainer_state)))
            (path / "COMPLETE").write_text(str(global_step))
            older = sorted(
                (int(m.group(1)), c) for c in self.checkpoint_dir.iterdir() if (m := _STEP_DIR.match(c.name))
            )
            for _, stale in older[: -self.keep]:
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path

    def load_latest(self, accelerator, trainer_state: "TrainerState | None" = None) -> bool:
        """``accelerator.load_state`` of the newest complete checkpoint (and its ``trainer_state.json`` into
        ``trainer_state``); False when there is none."""
        accelerator.wait_for_everyone()
        path = self.latest()
        if path is None:
            return False
        if trainer_state is not None:
            state_file = path / TRAINER_STATE
            if not state_file.is_file():
                raise OutputDirError(f"{path}: the checkpoint has no {TRAINER_STATE} (written by an older merits); "
                                     "start afresh with --overwrite_output_dir")
            trainer_state.load_state_dict({"json": state_file.read_text()})
        accelerator.load_state(str(path))
        accelerator.wait_for_everyone()
        return True

    def remove_checkpoints(self, accelerator) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.checkpoint_dir.is_dir():
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        accelerator.wait_for_everyone()

    # --- selected weights ----------------------------------------------------------------------
    def best_weights_path(self, head: str) -> Path:
        return self.stage_dir / f"best_{head or 'final'}.safetensors"

    def save_best(self, state_dict: dict[str, torch.Tensor], head: str) -> None:
        """Write the selected weights of ``head`` (main process only)."""
        from safetensors.torch import save_file

        self.stage_dir.mkdir(parents=True, exist_ok=True)
        path = self.best_weights_path(head)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
        tmp.replace(path)

    def load_best(self, head: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.best_weights_path(head)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the selected weights of stage {self.stage!r} ({head or 'final'}) are missing")
        return load_file(str(path))

    # --- results ---------------------------------------------------------------------------------
    @property
    def result_file(self) -> Path:
        return self.stage_dir / "result.json"

    def is_done(self) -> bool:
        return self.result_file.is_file()

    def write_result(self, result: dict[str, Any]) -> None:
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
        tmp.replace(self.result_file)

    def read_result(self) -> dict[str, Any]:
        return json.loads(self.result_file.read_text())
