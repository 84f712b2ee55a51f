"""The one training loop every stage of both systems runs (Accelerate: DDP, accumulation, bf16, resume).

A stage is described by a :class:`StagePlan`: the model stage name (``model.freeze_for_stage`` /
``forward(stage=...)``), the datasets (lists of items) and collate function, and the prediction
:class:`Head`\\ s that are scored on validation. Each head names the modules whose weights are kept
at *its* best validation weighted F1 (per-head model selection: stage I keeps the text encoder of the
best text epoch and the speech head of the best speech epoch, exactly as if they were trained apart).

:func:`run_stage` then

1. freezes everything but the stage's modules and wraps the model, optimizer, scheduler and data with
   a fresh :class:`accelerate.Accelerator` (one per stage: the trainable parameters change, so does DDP),
2. resumes from the stage's newest ``save_state`` checkpoint when there is one,
3. trains epoch by epoch (gradient accumulation, clipping, NaN/inf loss guard naming the step,
   ``save_state`` every ``checkpointing_steps`` updates and at each epoch end, tensorboard logs, tqdm),
4. evaluates every head on validation after each epoch and stores the selected weights,
5. loads the selected weights, evaluates validation and test once, writes ``result.json``.

Validation alone selects; the test split is scored once, with the selected model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed

from ..metrics import compute_erc_metrics
from .arguments import StageArguments
from .checkpointing import StageCheckpoints, TrainerState


logger = logging.getLogger("merits.training")

IGNORE_INDEX = -100


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the stage, epoch and step."""


@dataclass
class Head:
    """A prediction head scored on validation.

    Args:
        key: its part of the result keys (``"text"``, ``"audio"``, ``"speech_expert"``, or ``""`` for the
            stage's own output, e.g. fusion).
        logits: the attribute of the model output holding ``[B, T, C]`` logits, or ``"expert_logits:<i>"``.
        mask: batch key (``"text_mask"`` / ``"audio_mask"``) restricting the scored turns, if any.
        modules: names of the model's submodules (``"text_encoder"``, ...) whose weights are selected at this
            head's best validation weighted F1. Empty: the head is reported but selects nothing.
    """

    key: str
    logits: str
    mask: str | None = None
    modules: tuple = ()


@dataclass
class StagePlan:
    stage: str  # the model's stage name
    tag: str  # result-key name: "stage0", "stage1", "stage2", "stage3", "stage2+3", "moe"
    heads: list
    train: Sequence
    validation: Sequence
    test: Sequence | None
    collate_fn: Callable
    arguments: StageArguments
    label_names: list = field(default_factory=list)
    # called with the model right after `model.freeze_for_stage(stage)`, to freeze more (LoRA: the backbone's own weights)
    after_freeze: Callable | None = None
    # model -> [(parameters, StageArguments), ...]: optimiser groups with their own learning rate, weight decay,
    # betas, eps, warm-up and gradient clipping (stage I: the text encoder and the speech head as separate models);
    # None = one group with `arguments`
    param_groups: Callable | None = None
    # no model selection: every epoch replaces the kept weights, so the stage ends with the last epoch's (a refit on
    # training + validation data for a chosen number of epochs scores itself on its training data, where the first
    # epoch to fit it perfectly would otherwise stay selected)
    keep_last_epoch: bool = False


class EpochShuffleSampler(Sampler):
    """A permutation of ``range(n)`` fixed by ``seed + epoch``: a resumed run sees the same order."""

    def __init__(self, num_items: int, seed: int):
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


def item_lengths(items: Sequence) -> list[int]:
    """The padded length each training item brings to a batch, read from the items already in memory.

    A conversation (a list of turn rows, as ``plan.train`` holds them) counts its turns. Items of one turn
    (stage 0/I: ``utterance_items``) count the characters of their ``text``, else the samples of an
    in-memory ``audio`` array, else 1 (fixed-size ``audio_features``: nothing to group).
    """
    lengths = []
    for item in items:
        if len(item) != 1:
            lengths.append(len(item))
            continue
        row = item[0]
        text, audio = row.get("text"), row.get("audio")
        if isinstance(text, str):
            lengths.append(max(1, len(text)))
        elif isinstance(audio, dict) and audio.get("array") is not None:
            lengths.append(max(1, len(audio["array"])))
        elif audio is not None and hasattr(audio, "__len__") and not isinstance(audio, (str, dict)):
            lengths.append(max(1, len(audio)))
        else:
            lengths.append(1)
    return lengths


class LengthGroupedSampler(Sampler):
    """Batches of items of similar length in a random order, fixed by ``seed + epoch``.

    Like ``transformers.trainer_pt_utils.LengthGroupedSampler``: a random permutation (the epoch's seed) is
    cut into mega-batches of ``mega_batch_mult`` batches, each mega-batch is sorted by length (longest
    first; ties keep the random order) and cut into batches of ``batch_size``; then the order of the full
    batches is shuffled with the same generator. A short batch (the remainder, when ``batch_size`` does not
    divide the number of items) comes last, so every ``batch_size`` consecutive indices form one batch.

    ``batch_size`` is the batch of one optimiser update over all processes and accumulation steps: accelerate
    deals the per-process batches round-robin, so each update's micro-batches on every rank come from one
    length-sorted batch. Every rank builds the same order (it depends on ``seed`` and the epoch only),
    and ``skip_first_batches`` on a resumed run skips exactly the batches an unbroken run trained on.

    Args:
        lengths: the length of every item (:func:`item_lengths`).
        batch_size: items per (global) batch.
        seed: the run's seed; the epoch is added to it (``set_epoch``).
        mega_batch_mult: batches per mega-batch. Default ``min(50, max(4, n // (4 * batch_size)))``: at least
            4 batches per sorted group (homogeneous batches), and several groups per epoch when there are
            enough items (the batches' composition still changes from epoch to epoch).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_mult: int | None = None):
        if batch_size <= 0:
            raise ValueError(f"LengthGroupedSampler: batch_size must be positive, got {batch_size}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = int(batch_size)
        self.seed = seed
        if mega_batch_mult is None:
            mega_batch_mult = min(50, max(4, len(self.lengths) // (4 * self.batch_size)))
        if mega_batch_mult <= 0:
            raise ValueError(f"LengthGroupedSampler: mega_batch_mult must be positive, got {mega_batch_mult}")
        self.mega_batch_mult = int(mega_batch_mult)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order (the indices ``__iter__`` yields, cut every ``batch_size``)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.mega_batch_mult * self.batch_size
        full, remainder = [], []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])  # stable sort
            for begin in range(0, len(group), self.batch_size):
                batch = group[begin : begin + self.batch_size]
                (full if len(batch) == self.batch_size else remainder).append(batch)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return shuffled + remainder  # only the last mega-batch can leave a remainder

    def __iter__(self):
        return iter([index for batch in self.batches() for index in batch])

    def __len__(self) -> int:
        return len(self.lengths)


def training_sampler(plan: "StagePlan", seed: int, per_device: int, processes: int) -> Sampler:
    """The stage's training order: length-grouped batches (``group_by_length``) or a plain permutation.

    The grouped batch is one optimiser update (per-process batch x processes x accumulation steps): its
    micro-batches and the ranks' shares are consecutive slices of one length-sorted batch.
    """
    if plan.arguments.group_by_length:
        update_batch = per_device * processes * plan.arguments.gradient_accumulation_steps
        return LengthGroupedSampler(item_lengths(getattr(plan.train, "items", plan.train)), update_batch, seed)
    return EpochShuffleSampler(len(plan.train), seed)


def _logits(output, spec: str) -> torch.Tensor | None:
    if spec.startswith("expert_logits:"):
        experts = getattr(output, "expert_logits", None)
        index = int(spec.split(":", 1)[1])
        return None if experts is None else experts[index]
    return getattr(output, spec, None)


def _group_options(arguments: StageArguments) -> dict:
    return dict(lr=arguments.learning_rate, betas=(arguments.adam_beta1, arguments.adam_beta2), eps=arguments.adam_epsilon,
                weight_decay=arguments.weight_decay)


def build_optimizer(params, arguments: StageArguments, groups=None) -> torch.optim.Optimizer:
    """Adam/AdamW over the trainable ``params`` with ``arguments``; or, with ``groups`` (``[(params, StageArguments)]``),
    one parameter group per entry with its own settings. The groups share one optimiser class: the one of the groups
    with weight decay (Adam and AdamW differ only there), else ``arguments.optimizer``."""
    if groups is None:
        groups = [(params, arguments)]
    param_groups = []
    for group_params, group_arguments in groups:
        group_params = [p for p in group_params if p.requires_grad]
        if group_params:
            param_groups.append({"params": group_params, **_group_options(group_arguments)})
    params = [p for group in param_groups for p in group["params"]]
    if not params:
        raise RuntimeError("the stage has no trainable parameter (check freeze_for_stage and the modalities)")
    decaying = {a.optimizer for _, a in groups if a.weight_decay > 0}
    if len(decaying) > 1:
        raise ValueError(f"optimiser groups with weight decay need one optimizer class, got {sorted(decaying)}")
    kind = decaying.pop() if decaying else arguments.optimizer
    optimizer_class = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    # fused: one kernel per parameter for the whole update (on a CPU ~5x faster than foreach, which is ~5x faster than
    # the per-tensor loop: the step over MiSTER-E's 88.7 M parameters was ~10 % of a training step); same update rule
    if _fused_supported(params):
        return optimizer_class(param_groups, fused=True)
    return optimizer_class(param_groups, foreach=True)


def _fused_supported(params) -> bool:
    """Fused Adam/AdamW exists (torch >= 2.4, our minimum) for floating-point parameters on CPU, CUDA, XPU and MPS."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "xpu", "mps") for p in params)


_STAGE_LABELS = {"stage0": "stage 0 (pre-training)", "stage1": "stage I (utterance)", "stage2": "stage II (context)",
                 "stage3": "stage III (fusion)", "stage2+3": "stages II+III (joint)", "moe": "MoE"}


def progress_label(model, tag: str) -> str:
    """The progress bar's label: system and stage (``MERITS-L stage II (context)``), not the output folder's name."""
    architecture = getattr(getattr(model, "config", None), "architecture", None)
    system = {"merits-l": "MERITS-L", "mister-e": "MiSTER-E"}.get(architecture, architecture or "")
    return f"{system} {_STAGE_LABELS.get(tag, tag)}".strip()


def _lr_factor(arguments: StageArguments, total_steps: int):
    warmup = int(math.ceil(arguments.warmup_ratio * total_steps))
    if warmup <= 0:
        return lambda step: 1.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def build_scheduler(optimizer, arguments: StageArguments, total_steps: int, group_arguments=None):
    """Constant learning rate (the papers), or linear warm-up then linear decay when ``warmup_ratio > 0``; with
    ``group_arguments`` (one StageArguments per optimiser group) each group follows its own ``warmup_ratio``."""
    if group_arguments is None or len(group_arguments) == 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(arguments, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [_lr_factor(a, total_steps) for a in group_arguments])


def module_state(model: torch.nn.Module, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """The state-dict entries of the named submodules."""
    prefixes = tuple(f"{name}." for name in modules)
    return {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP (``configs/accelerate/fsdp.yaml``): every process holds only a shard of each parameter.
    FSDP1 (``fsdp_version: 1``, deprecated by torch) is refused: the loop gathers and loads weights the FSDP2 way."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not getattr(accelerator, "is_fsdp2", False):
        raise ValueError("FSDP1 (fsdp_version: 1) is not supported by merits' training loop: use FSDP2 "
                         "(fsdp_version: 2, as in configs/accelerate/fsdp.yaml)")
    return True


def selected_state(accelerator: Accelerator, wrapped, modules: Sequence[str]) -> dict[str, torch.Tensor]:
    """The full weights of the named submodules of the prepared model, on the main process.

    Under FSDP this gathers the shards (``accelerator.get_state_dict``: the full state dict on rank 0, empty elsewhere),
    so every process must call it; otherwise it reads the unwrapped model's own state dict."""
    if shards_parameters(accelerator):
        prefixes = tuple(f"{name}." for name in modules)
        return {k: v for k, v in accelerator.get_state_dict(wrapped).items() if k.startswith(prefixes)}
    return module_state(accelerator.unwrap_model(wrapped), modules)


def keep_present_layer_classes(accelerator: Accelerator, model: torch.nn.Module) -> list[str] | None:
    """Under FSDP with a transformer-layer wrap policy: keep the layer classes of the policy that ``model`` has.

    ``configs/accelerate/fsdp.yaml`` names the layers of every backbone the systems use (RobertaLayer for MERITS-L,
    Qwen2DecoderLayer and WhisperEncoderLayer for MiSTER-E, ...), while Accelerate refuses a class the model lacks.
    Returns the kept names (None when there is nothing to choose); a list of which the model has none is refused.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    names = getattr(plugin, "transformer_cls_names_to_wrap", None) if shards_parameters(accelerator) else None
    if not names or not isinstance(names, (list, tuple)):
        return None
    from accelerate.utils.dataclasses import get_module_class_from_name

    present = [name for name in names if get_module_class_from_name(model, name) is not None]
    if not present:
        raise ValueError(
            f"FSDP: the model has none of the layer classes to wrap ({', '.join(names)}); set "
            "fsdp_transformer_layer_cls_to_wrap (accelerate launch --fsdp_transformer_layer_cls_to_wrap NAME) to its "
            f"backbone's layer class, e.g. one of: {', '.join(sorted(_layer_classes(model))) or 'none found'}"
        )
    plugin.transformer_cls_names_to_wrap = present
    return present


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names of the modules that form a ``ModuleList`` (the repeated layers of a backbone)."""
    return {type(child).__name__ for module in model.modules() if isinstance(module, torch.nn.ModuleList)
            for child in module}


def configure_deepspeed(accelerator: Accelerator, arguments: StageArguments, group_arguments, per_device: int) -> None:
    """Under DeepSpeed (``configs/accelerate/deepspeed_zero2.yaml``): the stage's own batch, accumulation and clipping.

    The DeepSpeed config is one per run (AcceleratorState's plugin) while every stage has its own settings: before
    each stage's ``prepare`` this writes the per-process batch, ``gradient_accumulation_steps`` and
    ``gradient_clipping`` (the stage's ``max_grad_norm``; 0 = off) into it. DeepSpeed clips all gradients at one norm,
    so optimiser groups asking for different norms are refused. ZeRO-3 (partitioned parameters) is refused: this loop
    reads and loads the selected weights as whole tensors; configs/accelerate/fsdp.yaml shards parameters instead.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    zero_stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if zero_stage >= 3:
        raise ValueError("DeepSpeed ZeRO-3 is not supported by merits' training loop (it needs whole parameters to "
                         "select and load each head's weights): use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) "
                         "or FSDP (configs/accelerate/fsdp.yaml), which shards the parameters too")
    norms = {a.max_grad_norm for a in group_arguments} if group_arguments else {arguments.max_grad_norm}
    if len(norms) > 1:
        raise ValueError(f"DeepSpeed clips every gradient at one norm, but this stage's optimiser groups ask for "
                         f"max_grad_norm {sorted(norms, key=str)}: give them the same value (e.g. --speech_head.max_grad_norm)"
                         " or use DDP / FSDP")
    steps = arguments.gradient_accumulation_steps
    config["gradient_clipping"] = float(norms.pop() or 0.0)
    config["gradient_accumulation_steps"] = steps
    config["train_micro_batch_size_per_gpu"] = per_device
    config["train_batch_size"] = per_device * steps * accelerator.num_processes
    accelerator.gradient_accumulation_steps = steps  # ACCELERATE_GRADIENT_ACCUMULATION_STEPS (the launcher's) set it


def load_selected_state(accelerator: Accelerator, wrapped, state: dict[str, torch.Tensor]) -> None:
    """Load full weights (``selected_state``'s, read back from disk on every process) into the prepared model: under
    FSDP2 each process keeps its shard of them; otherwise a plain ``load_state_dict``."""
    if shards_parameters(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(wrapped, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        accelerator.unwrap_model(wrapped).load_state_dict(state, strict=False)


def evaluate_heads(accelerator: Accelerator, model, loader, plan: StagePlan, heads: Sequence[Head] | None = None):
    """Predictions of every head over ``loader`` (gathered over processes): ``{key: (preds, refs)}`` as 1-D tensors."""
    heads = list(heads if heads is not None else plan.heads)
    collected: dict[str, list] = {head.key: [] for head in heads}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            output = model(**batch, stage=plan.stage)
            labels = batch["labels"]
            for head in heads:
                logits = _logits(output, head.logits)
                if logits is None:
                    raise RuntimeError(f"stage {plan.stage!r}: the model output has no {head.logits!r} for head {head.key!r}")
                predictions = logits.argmax(dim=-1)
                references = labels
                if head.mask is not None and head.mask in batch:
                    references = labels.masked_fill(batch[head.mask] == 0, IGNORE_INDEX)
                predictions = accelerator.pad_across_processes(predictions, dim=1, pad_index=IGNORE_INDEX)
                references = accelerator.pad_across_processes(references, dim=1, pad_index=IGNORE_INDEX)
                predictions, references = accelerator.gather_for_metrics((predictions, references))
                # kept on the device: one host read per head at the end, not one per batch
                collected[head.key].append((predictions.reshape(-1), references.reshape(-1)))
    model.train()
    result = {}
    for key, parts in collected.items():
        if parts:
            predictions = torch.cat([p for p, _ in parts]).cpu()
            references = torch.cat([r for _, r in parts]).cpu()
            keep = references != IGNORE_INDEX
            result[key] = (predictions[keep], references[keep])
        else:
            result[key] = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return result


def score(predictions: dict, label_names: Sequence[str]) -> dict[str, dict]:
    """``{key: erc metrics}`` for every head that has scored turns."""
    scores = {}
    for key, (preds, refs) in predictions.items():
        if refs.numel() == 0:
            continue
        scores[key] = compute_erc_metrics(preds.tolist(), refs.tolist(), label_names=label_names)
    return scores


def result_key(split: str, tag: str, head_key: str, metric: str) -> str:
    """Flat result key: ``validation_stage2_text_weighted_f1``; the final head of the run has no tag."""
    parts = [split, tag, head_key, metric]
    return "_".join(p for p in parts if p)


def cpu_only() -> bool:
    """True on a machine without an accelerator: then torchrun's processes must be told to use gloo DDP on CPU.

    Accelerate treats ``torchrun --nproc_per_node 2`` on a CPU-only machine as N independent single-process
    runs unless ``cpu=True`` is given (``accelerate launch --cpu`` sets it through ``ACCELERATE_USE_CPU``).
    """
    if hasattr(torch, "accelerator"):
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()


def distributed_state():
    """The process-wide ``PartialState`` (the first call decides the backend: gloo DDP when CPU-only)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def make_accelerator(run_args, arguments: StageArguments, run_dir: Path) -> Accelerator:
    """A fresh Accelerator for one stage (gloo DDP on CPU under torchrun, bf16 autocast when asked)."""
    log_with = None if run_args.report_to == "none" else run_args.report_to
    asked = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(variable, "false").lower() == "true"]
    if asked and cpu_only() and os.environ.get("RANK", "0") == "0":  # said once, by the first process
        import warnings

        warnings.warn(f"Accelerate runs {asked[0]} only on accelerator devices: on this CPU-only machine the processes "
                      "train with gloo DDP instead (each holds the whole model and optimizer state)", stacklevel=2)
    return Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=arguments.gradient_accumulation_steps,
        mixed_precision=run_args.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def run_stage(model: torch.nn.Module, plan: StagePlan, run_args, run_dir: Path, progress: bool = True):
    """Train ``plan`` (or load its finished result), leave the selected weights in ``model``.

    Returns ``(results, predictions)``: flat metrics (validation and test, this stage's keys) and the
    validation/test predictions per head (for confusion matrices).
    """
    from tqdm.auto import tqdm

    arguments = plan.arguments
    checkpoints = StageCheckpoints(run_dir, plan.tag)
    accelerator = make_accelerator(run_args, arguments, run_dir)
    selecting = [head for head in plan.heads if head.modules]

    if checkpoints.is_done():
        accelerator.wait_for_everyone()
        for head in selecting:
            model.load_state_dict(checkpoints.load_best(head.key), strict=False)
        accelerator.print(f"[{plan.tag}] finished earlier: loaded its selected weights from {checkpoints.stage_dir}")
        return checkpoints.read_result(), None

    for name, split in (("train", plan.train), ("validation", plan.validation)):
        if split is None or len(split) == 0:
            raise ValueError(f"stage {plan.tag}: the {name} split is empty")

    set_seed(run_args.seed)
    model.freeze_for_stage(plan.stage)
    if plan.after_freeze is not None:
        plan.after_freeze(model)
    model.train()
    # FSDP shards the module it prepares in place (and with cpu_ram_efficient_loading empties it on every process but
    # the first): it gets a copy, and the selected weights come back into `model` from the stage's best files below,
    # so the caller's model stays a plain module for the next stages, the feature export and save_pretrained
    sharded = shards_parameters(accelerator)
    trained = copy.deepcopy(model) if sharded else model

    processes = accelerator.num_processes
    per_device = max(1, arguments.batch_size // (processes * arguments.gradient_accumulation_steps))
    if per_device * processes * arguments.gradient_accumulation_steps != arguments.batch_size:
        accelerator.print(
            f"[{plan.tag}] batch_size {arguments.batch_size} is not a multiple of {processes} processes x "
            f"{arguments.gradient_accumulation_steps} accumulation steps: using {per_device} per process"
        )
    sampler = training_sampler(plan, run_args.seed, per_device, processes)
    # Every loader gets its own generator: creating an iterator must not draw from the global torch RNG
    # (dropout's), or a run resumed mid-epoch would see other dropout masks than an unbroken one.
    train_loader = DataLoader(
        plan.train, batch_size=per_device, sampler=sampler, collate_fn=plan.collate_fn, generator=torch.Generator()
    )
    eval_batch = max(per_device, 8)
    validation_loader = DataLoader(
        plan.validation, batch_size=eval_batch, shuffle=False, collate_fn=plan.collate_fn, generator=torch.Generator()
    )
    test_loader = (
        DataLoader(plan.test, batch_size=eval_batch, shuffle=False, collate_fn=plan.collate_fn, generator=torch.Generator())
        if plan.test
        else None
    )

    updates_per_epoch = math.ceil(math.ceil(len(plan.train) / (per_device * processes)) / arguments.gradient_accumulation_steps)
    total_updates = updates_per_epoch * arguments.num_epochs
    groups = plan.param_groups(trained) if plan.param_groups is not None else None
    if groups:
        groups = [(list(p), a) for p, a in groups]
        groups = [(p, a) for p, a in groups if any(x.requires_grad for x in p)] or None
    optimizer = build_optimizer(trained.parameters(), arguments, groups)
    group_arguments = [a for _, a in groups] if groups else None
    scheduler = build_scheduler(optimizer, arguments, total_updates, group_arguments)

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator, arguments, group_arguments, per_device)
    wrapped_layers = keep_present_layer_classes(accelerator, trained)
    if wrapped_layers:
        accelerator.print(f"[{plan.tag}] FSDP: each {', '.join(wrapped_layers)} is its own shard unit")
    wrapped, optimizer, train_loader, validation_loader, scheduler = accelerator.prepare(
        trained, optimizer, train_loader, validation_loader, scheduler
    )
    # gradient clipping per optimiser group, each at its own max_grad_norm (None: no clipping); read after prepare,
    # which gives FSDP's optimizer new parameter lists (the sharded parameters)
    clip_groups = ([(group["params"], a.max_grad_norm) for group, a in zip(optimizer.param_groups, group_arguments)]
                   if group_arguments else [(None, arguments.max_grad_norm)])
    if test_loader is not None:
        test_loader = accelerator.prepare(test_loader)
    state = TrainerState()
    if checkpoints.load_latest(accelerator, state):
        accelerator.print(
            f"[{plan.tag}] resumed from {checkpoints.latest()} (epoch {state.epoch}, step {state.global_step})"
        )
    if accelerator.trackers == [] and run_args.report_to != "none":
        accelerator.init_trackers(plan.tag.replace("+", "_"))

    bar = tqdm(
        total=total_updates,
        initial=state.global_step,
        desc=progress_label(model, plan.tag),
        disable=not (progress and accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    # Each step's loss stays on the device until it is read: ONE host read per logging interval, checkpoint and
    # epoch end instead of one per step (a host-device sync, and a collective on several processes, that would stall
    # every GPU step). That read also checks every process's losses for NaN/inf and names the first bad step.
    pending_losses, pending_steps, running = [], [], []

    def read_losses():
        if not pending_losses:
            return
        losses = torch.stack(pending_losses)
        gathered = accelerator.gather(losses).reshape(-1, losses.numel()).tolist()  # [processes, steps]
        for position, where in enumerate(pending_steps):
            bad = [row[position] for row in gathered if not math.isfinite(row[position])]
            if bad:
                epoch, batch, step = where
                raise NonFiniteLossError(
                    f"stage {plan.tag}: the training loss became {bad[0]} at epoch {epoch}, batch {batch}, optimizer "
                    f"step {step}; lower the learning rate or check the inputs for NaN/inf"
                )
        running.extend(gathered[accelerator.process_index if len(gathered) > 1 else 0])
        pending_losses.clear()
        pending_steps.clear()

    stop = False
    while state.epoch < arguments.num_epochs and not stop:
        train_loader.set_epoch(state.epoch)
        if hasattr(plan.train, "set_epoch"):  # e.g. merits.data.RandomAudioCrop: this epoch's random windows
            plan.train.set_epoch(state.epoch)
        loader = train_loader
        if state.step_in_epoch > 0:
            loader = accelerator.skip_first_batches(train_loader, state.step_in_epoch)
        for batch in loader:
            with accelerator.accumulate(wrapped):
                output = wrapped(**batch, stage=plan.stage)
                loss = output.loss
                pending_losses.append(loss.detach().float().reshape(()))
                pending_steps.append((state.epoch, state.step_in_epoch, state.global_step + 1))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    for clip_params, max_norm in clip_groups:
                        if max_norm:
                            accelerator.clip_grad_norm_(wrapped.parameters() if clip_params is None else clip_params,
                                                        max_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.step_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            bar.update(1)
            if state.global_step % run_args.logging_steps == 0:
                read_losses()
            if state.global_step % run_args.logging_steps == 0 and running:
                mean_loss = sum(running) / len(running)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log = {f"{plan.tag}/train_loss": mean_loss, f"{plan.tag}/learning_rate": scheduler.get_last_lr()[0]}
                terms = getattr(output, "loss_terms", None) or {}
                if terms:  # one host read for all of them
                    values = torch.stack([value.float().reshape(()) for value in terms.values()]).tolist()
                    log.update({f"{plan.tag}/train_{name}": value for name, value in zip(terms, values)})
                accelerator.log(log, step=state.global_step)
                running.clear()
            if state.global_step % run_args.checkpointing_steps == 0:
                read_losses()  # never save weights that a non-finite loss has updated
                checkpoints.save(accelerator, state.global_step, state)
            if run_args.debug_exit_after_step is not None and state.global_step >= run_args.debug_exit_after_step:
                accelerator.print(f"[{plan.tag}] debug_exit_after_step={run_args.debug_exit_after_step}: exiting hard")
                os._exit(17)

        # ---- end of epoch: validation and model selection ----
        read_losses()
        scores = score(evaluate_heads(accelerator, wrapped, validation_loader, plan), plan.label_names)
        improved_any = False
        entry = {"epoch": state.epoch, "step": state.global_step}
        for head in plan.heads:
            if head.key not in scores:
                continue
            wf1 = scores[head.key]["weighted_f1"]
            entry[f"validation_{head.key or 'final'}_weighted_f1"] = wf1
            accelerator.log({f"{plan.tag}/validation_{head.key or 'final'}_weighted_f1": wf1}, step=state.global_step)
            if head.modules and (plan.keep_last_epoch or wf1 > state.best.get(head.key, -1.0)):
                state.best[head.key] = wf1
                state.best_epoch[head.key] = state.epoch
                state.best_metrics[head.key] = scores[head.key]
                improved_any = True
                weights = selected_state(accelerator, wrapped, head.modules)  # every process (FSDP gathers)
                if accelerator.is_main_process:
                    checkpoints.save_best(weights, head.key)
        missing = [head.key or "final" for head in selecting if head.key not in scores]
        if missing:
            raise ValueError(
                f"stage {plan.tag}: the validation split has no labelled turn for {missing}; cannot select a model"
            )
        state.history.append(entry)
        accelerator.print(
            f"[{plan.tag}] epoch {state.epoch + 1}/{arguments.num_epochs}: "
            + ", ".join(f"{k.replace('validation_', 'val ')}={v:.4f}" for k, v in entry.items() if k.startswith("validation_"))
        )
        state.bad_epochs = 0 if improved_any else state.bad_epochs + 1
        state.epoch += 1
        state.step_in_epoch = 0
        state.epochs_done += 1
        if arguments.early_stopping_patience is not None and state.bad_epochs >= arguments.early_stopping_patience:
            accelerator.print(f"[{plan.tag}] early stopping: no better validation wF1 for {state.bad_epochs} epochs")
            stop = True
        checkpoints.save(accelerator, state.global_step, state)
    bar.close()

    # ---- the selected model: load it, score validation and test once ----
    accelerator.wait_for_everyone()
    for head in selecting:
        best = checkpoints.load_best(head.key)
        model.load_state_dict(best, strict=False)  # the caller's module (under DDP the one `wrapped` wraps)
        if sharded:
            load_selected_state(accelerator, wrapped, best)  # the sharded copy that scores validation and test
    results: dict = {}
    predictions = {}
    for split, loader in (("validation", validation_loader), ("test", test_loader)):
        if loader is None:
            continue
        split_predictions = evaluate_heads(accelerator, wrapped, loader, plan)
        predictions[split] = split_predictions
        for key, metrics in score(split_predictions, plan.label_names).items():
            for metric, value in metrics.items():
                results[result_key(split, plan.tag, key, metric)] = value
    for head in selecting:
        results[result_key("", plan.tag, head.key, "best_epoch")] = state.best_epoch.get(head.key, -1) + 1
    results[result_key("", plan.tag, "", "epochs")] = state.epochs_done
    if accelerator.is_main_process:
        checkpoints.write_result(results)
    # finish this stage's trackers only: accelerator.end_training() would also destroy the process group that
    # the later stages of the run still use (their barriers would then return at once on every rank)
    for tracker in accelerator.trackers:
        tracker.finish()
    checkpoints.remove_checkpoints(accelerator)
    if sharded:
        accelerator.free_memory()  # the sharded copy, its optimizer state and gradients
        del wrapped, trained, optimizer
    model.freeze_for_stage(plan.stage)  # leave requires_grad as the stage set it; callers refreeze per stage
    model.eval()
    return results, predictions
