"""Stage II/III (MERITS-L) and MoE (MiSTER-E) training on cached embeddings: ours vs the reference loops.

    python bench/bench_training.py            # full run (IEMOCAP-like sizes, ~10 minutes on an idle 2-core machine)
    python bench/bench_training.py --quick    # tiny sizes: exercises every code path in seconds

What it measures, for each system and implementation, each in a FRESH subprocess (so the peak RSS
is that run's own high-water mark, read with ``resource.getrusage``; tracemalloc cannot see torch):

- training throughput in real (non-padded) utterances per second, counting only the optimisation
  steps (collate, forward, loss, backward, clip, step) - evaluation is timed apart - and per CPU-second
  of the process (less dependent on the load of a shared machine);
- peak resident memory (``ru_maxrss``) and the same minus the RSS right after the data was built;
- validation weighted F1 (padding dropped) after every epoch: the last epoch's, the best one and its epoch.

Then, per system, one more process (``--paired_epochs`` epochs per stage, default 2; 0 skips it) builds the
reference and ours side by side and interleaves their optimisation steps one by one, the order flipped at every step
(``*paired_speedup_ours_vs_reference``): this host's speed drifts by up to ~30 % within minutes, and a drift then hits
both sides alike; but every switch starts a step on caches the other model filled (likely costing the faster side more),
so these ratios came out below the separate runs' (no validation, no memory figure in that run).

Implementations (the same batch size and number of epochs for all):

- ``reference``: ``bench/reference`` (faithful to the authors' loops: zero-padded batches, no packing,
  no masks, losses over padded rows; MiSTER-E Adam 1e-5 / clip 1.0, MERITS-L AdamW 1e-4), conversations
  in random order (the authors' ``DataLoader(shuffle=True)``).
- ``ours``: ``merits.MeritsForConversationClassification`` driven as the trainer drives it
  (``merits.data.FeatureCollator`` on the trainer's row conversations, ``merits.training.loop.build_optimizer``
  with the trainer's stage defaults, and the trainer's own sampler ``merits.training.loop.training_sampler``:
  with the default ``group_by_length: true``, batches of conversations of similar length in random order).
- ``ours_random`` (MERITS-L by default; MiSTER-E with ``--random_order_variant``): the same with
  ``group_by_length: false``, i.e. the reference's random batches, to separate what masking/packing
  buys from what length grouping buys.

Data: synthetic IEMOCAP-like conversations (20-110 turns, mean ~50, 6 classes whose labels follow a sticky
Markov chain), generated from a seed inside each worker. Each turn's text and speech embedding (2048-d) is
``signal * prototype[cue] + per-dialogue offset + noise``: the cue is the turn's emotion with probability
``--text_cue`` / ``--audio_cue`` and a random emotion otherwise, so one modality alone cannot be right
more often than its cue (``data/*_cue_accuracy``); the two modalities and the conversation context
carry more. ``data/validation_chance_weighted_f1`` is the wF1 of random guesses with the training label
frequencies.

Optimisers: each implementation uses its own paper settings (MiSTER-E Adam 1e-5, MERITS-L AdamW 1e-4).
``--moe_learning_rate X`` gives BOTH MiSTER-E implementations Adam with learning rate X instead (the papers'
1e-5 is meant for 100 epochs of ~15 updates; the budget here is a few updates); the figure
``*/optimizer`` of every run says what it used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NUM_CLASSES = 6
# the default run: ~10 minutes on an idle 2-core machine (see bench/README.md)
TRAIN_DIALOGUES, VALIDATION_DIALOGUES = 32, 12
EPOCHS, MERITS_L_EPOCHS = 2, 10
MOE_LEARNING_RATE = None


# ----------------------------------------------------------------------------------------------------- data



def train_step(model, optimizer, batch: dict, stage: str, max_grad_norm) -> None:
    """One optimisation step of our model, as `merits.training` takes it (clip, step, zero_grad)."""
    import torch

    model.train()
    model(**batch, stage=stage).loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()

def synthetic_conversations(num_dialogues: int, dim: int, seed: int, min_turns: int = 20, max_turns: int = 110,
                            mean_turns: float = 50.0, text_cue: float = 0.8, audio_cue: float = 0.65, stay: float = 0.8,
                            signal: float = 1.0, noise: float = 1.0, offset: float = 0.5) -> list[dict]:
    """IEMOCAP-like conversations of cached embeddings, as the trainer's feature items.

    Lengths: ``min_turns`` + a gamma draw with mean ``mean_turns - min_turns``, clipped to ``max_turns``.
    Labels follow a sticky Markov chain (stay with probability ``stay``), so context helps. Per modality, each
    turn shows a cue: its label with probability ``text_cue`` / ``audio_cue``, else a uniformly drawn emotion
    (independently per modality, so fusing both helps). Embedding = ``signal`` x the cue's prototype (entries
    N(0, 1), fixed for every split) + ``offset`` x a per-dialogue N(0, 1) vector + ``noise`` x N(0, 1) per turn:
    the class structure is a large part of the variance, as in fine-tuned utterance embeddings.
    """
    rng = np.random.default_rng(seed)
    class_rng = np.random.default_rng(1234)  # the prototypes are the same for every split
    prototypes = {modality: class_rng.standard_normal((NUM_CLASSES, dim)) for modality in ("text", "audio")}
    items = []
    for _ in range(num_dialogues):
        extra = mean_turns - min_turns
        length = int(min(max_turns, min_turns + rng.gamma(shape=2.0, scale=extra / 2.0)))
        labels = np.empty(length, dtype=np.int64)
        labels[0] = rng.integers(NUM_CLASSES)
        for t in range(1, length):
            labels[t] = labels[t - 1] if rng.random() < stay else rng.integers(NUM_CLASSES)
        item = {"labels": labels}
        for modality, cue_probability in (("text", text_cue), ("audio", audio_cue)):
            cues = np.where(rng.random(length) < cue_probability, labels, rng.integers(NUM_CLASSES, size=length))
            x = signal * prototypes[modality][cues] + offset * rng.standard_normal(dim) + noise * rng.standard_normal((length, dim))
            item[f"{modality}_embeds"] = x.astype(np.float32)
            item[f"{modality}_mask"] = np.ones(length, dtype=np.int64)
            item[f"{modality}_cues"] = cues
        items.append(item)
    return items


def data_figures(train: list[dict], validation: list[dict], seed: int = 0) -> dict:
    """What the synthetic data allows: per-modality cue accuracy and the wF1 of random guessing."""
    gold = np.concatenate([item["labels"] for item in validation])
    frequencies = np.bincount(np.concatenate([item["labels"] for item in train]), minlength=NUM_CLASSES)
    guesses = np.random.default_rng(seed).choice(NUM_CLASSES, size=len(gold), p=frequencies / frequencies.sum())
    figures = {"validation_chance_weighted_f1": weighted_f1(gold.tolist(), guesses.tolist())}
    for modality in ("text", "audio"):
        cues = np.concatenate([item[f"{modality}_cues"] for item in validation])
        figures[f"validation_{modality}_cue_accuracy"] = float((cues == gold).mean())
    return figures


def as_feature_rows(items: list[dict]) -> list[list[dict]]:
    """Our conversation arrays -> the trainer's in-memory feature conversations (one dict per turn, as
    ``merits.training.stages.feature_conversations`` builds them for ``merits.data.FeatureCollator``)."""
    conversations = []
    for index, item in enumerate(items):
        conversations.append([
            {"dialogue_id": f"d{index}", "turn": t, "label": int(label),
             "text_embeds": item["text_embeds"][t], "audio_embeds": item["audio_embeds"][t]}
            for t, label in enumerate(item["labels"])
        ])
    return conversations


def _cut(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def random_batches(items: list, batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """The reference's order (and the trainer's with ``group_by_length: false``): a permutation per epoch,
    :class:`merits.training.loop.EpochShuffleSampler`, cut into batches."""
    from merits.training.loop import EpochShuffleSampler

    sampler = EpochShuffleSampler(len(items), seed)
    sampler.set_epoch(epoch)
    return _cut(list(sampler), batch_size)


def _lengths(items: list) -> list[int]:
    from merits.training.loop import item_lengths

    return [len(item["labels"]) for item in items] if items and isinstance(items[0], dict) else item_lengths(items)


def length_grouped_batches(items: list, batch_size: int, seed: int, epoch: int = 0) -> list[list[int]]:
    """The trainer's length-grouped order: :class:`merits.training.loop.LengthGroupedSampler`, cut into batches."""
    from merits.training.loop import LengthGroupedSampler

    sampler = LengthGroupedSampler(_lengths(items), batch_size, seed)
    sampler.set_epoch(epoch)
    return _cut(list(sampler), batch_size)


def trainer_batches(rows: list[list[dict]], stage_args, batch_size: int, seed: int):
    """``epoch -> batches`` exactly as ``merits.training.loop.run_stage`` orders one process's training data:
    its ``training_sampler`` (length-grouped or not, per ``stage_args.group_by_length``), cut like its DataLoader."""
    from merits.training.loop import StagePlan, training_sampler

    plan = StagePlan("bench", "bench", [], rows, rows, None, None, stage_args)
    sampler = training_sampler(plan, seed, per_device=batch_size, processes=1)

    def batches(epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        return _cut(list(sampler), batch_size)

    return batches


def padding_ratio(items: list[dict], batches: list[list[int]]) -> float:
    """Padded positions computed / real utterances."""
    padded = sum(len(b) * max(len(items[i]["labels"]) for i in b) for b in batches)
    return padded / sum(len(items[i]["labels"]) for b in batches for i in b)


def weighted_f1(gold, pred) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, average="weighted"))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------- workers


def _profile_top(step_fn, steps: int = 2, top: int = 6) -> str:
    """Top ops by self CPU time over a few steps (what bounds the step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step_fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return "; ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:top])


def _reference_tensors(items, index):
    from bench.reference.mister_e import pad_batch
    import torch

    convs = [{"audio": items[i]["audio_embeds"], "text": items[i]["text_embeds"],
              "labels": torch.as_tensor(items[i]["labels"])} for i in index]
    return pad_batch(convs)


def _option(args, name: str, default=None):
    """Options added after the in-process smoke tests' argument objects were written."""
    return getattr(args, name, default)


def _our_stage_arguments(stage: str, impl: str, args):
    """The trainer's default settings of ``stage``, at the bench's batch size; ``ours_random``: no length grouping."""
    import dataclasses

    from merits.training.arguments import TrainingArguments

    stage_args = dataclasses.replace(getattr(TrainingArguments(), stage), batch_size=args.batch_size)
    if impl == "ours_random":
        stage_args = dataclasses.replace(stage_args, group_by_length=False)
    if stage == "moe" and _option(args, "moe_learning_rate") is not None:
        stage_args = dataclasses.replace(stage_args, learning_rate=args.moe_learning_rate)
    return stage_args


def build_mister_e(impl: str, train, validation, args) -> tuple[dict, list[str], object]:
    """``(result, ["moe"], make_stage)``: ``make_stage("moe")`` gives ``(step, evaluate, batches)`` of ``impl``."""
    import torch

    result: dict = {}
    torch.manual_seed(args.seed)
    if impl == "reference":
        from bench.reference import mister_e as ref

        model = ref.ReferenceAttentionMoE(args.dim, NUM_CLASSES, hidden_dim=args.hidden, fusion_dim=args.fusion_dim)
        learning_rate = _option(args, "moe_learning_rate") or 1e-5  # the paper's Adam 1e-5 unless both are told otherwise
        optimizer = ref.make_optimizer(model, lr=learning_rate)
        result["optimizer"] = f"adam lr {learning_rate:g} clip 1.0"
        batches = lambda epoch: random_batches(train, args.batch_size, args.seed, epoch)  # noqa: E731

        def step(index):
            audio, text, labels = _reference_tensors(train, index)
            ref.train_step(model, optimizer, audio, text, labels)

        def evaluate():
            pred, gold = [], []
            for i in range(len(validation)):  # the reference validates with batch 1
                p, g = ref.predict(model, *_reference_tensors(validation, [i]))
                pred += p
                gold += g
            return {"validation_weighted_f1": weighted_f1(gold, pred)}
    else:
        from merits import MeritsConfig, MeritsForConversationClassification
        from merits.training.loop import build_optimizer
        from merits.data.collate import FeatureCollator

        config = MeritsConfig(architecture="mister-e", text_embed_dim=args.dim, audio_embed_dim=args.dim,
                              context_text_hidden_size=args.hidden, context_audio_hidden_size=args.hidden,
                              context_conv_channels=2 * args.hidden, fusion_hidden_size=args.fusion_dim,
                              id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, stage="moe")
        model = MeritsForConversationClassification(config)
        model.freeze_for_stage("moe")
        stage_args = _our_stage_arguments("moe", impl, args)
        optimizer = build_optimizer(model.parameters(), stage_args)
        result["optimizer"] = f"{stage_args.optimizer} lr {stage_args.learning_rate:g} clip {stage_args.max_grad_norm}"
        result["group_by_length"] = stage_args.group_by_length
        collate_features = FeatureCollator()
        train_rows, validation_rows = as_feature_rows(train), as_feature_rows(validation)
        batches = trainer_batches(train_rows, stage_args, args.batch_size, args.seed)

        def step(index):
            train_step(model, optimizer, collate_features([train_rows[i] for i in index]), "moe", stage_args.max_grad_norm)

        def evaluate():
            model.eval()
            pred, gold = [], []
            with torch.no_grad():
                for start in range(0, len(validation), 8):
                    batch = collate_features(validation_rows[start : start + 8])
                    logits = model(**batch, stage="moe").logits
                    keep = batch["labels"] >= 0
                    pred += logits.argmax(-1)[keep].tolist()
                    gold += batch["labels"][keep].tolist()
            return {"validation_weighted_f1": weighted_f1(gold, pred)}

    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result, ["moe"], lambda stage: (step, evaluate, batches)


def run_mister_e(impl: str, train, validation, args) -> dict:
    result, _, make_stage = build_mister_e(impl, train, validation, args)
    result.update(_train_epochs(*make_stage("moe"), train, args.epochs, args))
    return result


def build_merits_l(impl: str, train, validation, args) -> tuple[dict, list[str], object]:
    """``(result, ["context", "fusion"], make_stage)``; ``make_stage(stage)`` gives ``(step, evaluate, batches)`` and,
    for our stage III, first exports the stage II features (``result["fusion_export_seconds"]``)."""
    import torch

    result: dict = {}
    torch.manual_seed(args.seed)
    text_hidden, audio_hidden = args.hidden, max(1, args.hidden // 4)  # papers §6 #8: 512 text / 128 speech
    if impl == "reference":
        from bench.reference import merits_l as ref

        model = ref.ReferenceMeritsL(args.dim, args.dim, NUM_CLASSES, text_hidden, audio_hidden, args.fusion_dim)
        batches = lambda epoch: random_batches(train, args.batch_size, args.seed, epoch)  # noqa: E731

        def make_stage(stage):
            optimizer = ref.make_optimizer(model, stage, lr=1e-4)
            result[f"{stage}_optimizer"] = "adamw lr 0.0001 (torch default weight decay 0.01), no clipping"

            def step(index):
                ref.train_step(model, optimizer, *_reference_tensors(train, index), stage=stage)

            def evaluate():
                scores = {}
                heads = ["text", "audio"] if stage == "context" else ["fusion"]
                for name in heads:
                    pred, gold = [], []
                    for i in range(len(validation)):
                        p, g = ref.predict(model, *_reference_tensors(validation, [i]), stage=stage, modality=name)
                        pred += p
                        gold += g
                    scores[f"validation_{name}_weighted_f1"] = weighted_f1(gold, pred)
                return scores

            return step, evaluate, batches
    else:
        from merits import MeritsConfig, MeritsForConversationClassification
        from merits.training.loop import build_optimizer
        from merits.data.collate import FeatureCollator

        config = MeritsConfig(architecture="merits-l", text_embed_dim=args.dim, audio_embed_dim=args.dim,
                              context_text_hidden_size=text_hidden, context_audio_hidden_size=audio_hidden,
                              fusion_hidden_size=args.fusion_dim,
                              id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, stage="context")
        model = MeritsForConversationClassification(config)
        collate_features = FeatureCollator()
        train_rows, validation_rows = as_feature_rows(train), as_feature_rows(validation)

        def make_stage(stage):
            model.freeze_for_stage(stage)
            stage_args = _our_stage_arguments(stage, impl, args)
            rows, validation_rows_ = train_rows, validation_rows
            if stage == "fusion":
                # as the trainer does (merits.training.stages.export_context_features, §3.1): stage III trains on the
                # stage II features exported once; the export is timed as part of stage III training
                from merits.training.stages import export_context_features

                start, cpu = time.perf_counter(), time.process_time()
                rows = export_context_features(model, train_rows)
                result["fusion_export_seconds"] = time.perf_counter() - start
                result["fusion_export_cpu_seconds"] = time.process_time() - cpu
                validation_rows_ = export_context_features(model, validation_rows)
            optimizer = build_optimizer(model.parameters(), stage_args)
            result[f"{stage}_optimizer"] = (f"{stage_args.optimizer} lr {stage_args.learning_rate:g} weight decay "
                                            f"{stage_args.weight_decay:g} clip {stage_args.max_grad_norm}")
            result[f"{stage}_group_by_length"] = stage_args.group_by_length

            def step(index):
                train_step(model, optimizer, collate_features([rows[i] for i in index]), stage, stage_args.max_grad_norm)

            def evaluate():
                model.eval()
                heads = {"text": "context_text_logits", "audio": "context_audio_logits"} if stage == "context" else {"fusion": "fusion_logits"}
                pred = {k: [] for k in heads}
                gold = []
                with torch.no_grad():
                    for start in range(0, len(validation), 8):
                        batch = collate_features(validation_rows_[start : start + 8])
                        out = model(**batch, stage=stage)
                        keep = batch["labels"] >= 0
                        gold += batch["labels"][keep].tolist()
                        for name, attr in heads.items():
                            pred[name] += getattr(out, attr).argmax(-1)[keep].tolist()
                return {f"validation_{k}_weighted_f1": weighted_f1(gold, v) for k, v in pred.items()}

            return step, evaluate, trainer_batches(train_rows, stage_args, args.batch_size, args.seed)

    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result, ["context", "fusion"], make_stage


def run_merits_l(impl: str, train, validation, args) -> dict:
    result, stages, make_stage = build_merits_l(impl, train, validation, args)
    epochs = _option(args, "merits_l_epochs") or args.epochs
    for stage in stages:
        step, evaluate, batches = make_stage(stage)
        for key, value in _train_epochs(step, evaluate, batches, train, epochs, args).items():
            result[f"{stage}_{key}"] = value
    if "fusion_export_seconds" in result:  # the one-off export counts as stage III training time
        utterances = result["fusion_train_utterances_per_second"] * result["fusion_train_seconds"]
        result["fusion_train_seconds"] += result["fusion_export_seconds"]
        result["fusion_train_utterances_per_second"] = utterances / result["fusion_train_seconds"]
        cpu_seconds = utterances / result["fusion_train_utterances_per_cpu_second"] + result["fusion_export_cpu_seconds"]
        result["fusion_train_utterances_per_cpu_second"] = utterances / cpu_seconds
    return result


def _train_epochs(step, evaluate, batches, train, epochs: int, args) -> dict:
    """Train ``epochs`` epochs of ``batches(epoch)``; validation after every epoch (timed apart)."""
    seconds, cpu_seconds, eval_seconds, utterances, padded_ratio = 0.0, 0.0, 0.0, 0, []
    first_step_seconds = None
    history: list[dict] = []
    for epoch in range(epochs):
        epoch_batches = batches(epoch)
        padded_ratio.append(padding_ratio(train, epoch_batches))
        for index in epoch_batches:
            start, cpu = time.perf_counter(), time.process_time()
            step(index)
            elapsed = time.perf_counter() - start
            if first_step_seconds is None and len(epoch_batches) * epochs > 1:
                # the run's first step (first-touch allocations, optimiser state) is timed apart, for every
                # implementation alike: the throughput is the steady state's
                first_step_seconds = elapsed
                continue
            seconds += elapsed
            cpu_seconds += time.process_time() - cpu
            utterances += sum(len(train[i]["labels"]) for i in index)
        start = time.perf_counter()
        history.append(evaluate())
        eval_seconds += time.perf_counter() - start
        print(f"epoch {epoch + 1}/{epochs}: {history[-1]} ({seconds:.0f} s training so far)", file=sys.stderr, flush=True)
    out = {
        "train_utterances_per_second": utterances / seconds,
        "train_seconds": seconds,
        "first_step_seconds": first_step_seconds,
        # process CPU time (all threads): depends less on the share of a loaded machine we got
        "train_utterances_per_cpu_second": utterances / cpu_seconds,
        "eval_seconds": eval_seconds,
        "padded_per_real_utterance": float(np.mean(padded_ratio)),
        "epochs": epochs,
        **history[-1],
    }
    for key in history[-1]:  # validation selects, as in the trainer and the authors' code
        best = max(range(epochs), key=lambda e: history[e][key])
        out[f"best_{key}"] = history[best][key]
        out[f"best_{key}_epoch"] = best + 1
        out[f"{key}_per_epoch"] = ",".join(f"{h[key]:.3f}" for h in history)
    if args.profile:
        it = itertools.cycle(batches(99))
        out["profile_top_ops"] = _profile_top(lambda: step(next(it)))
    return out


def run_paired(system: str, train, validation, args) -> dict:
    """Reference and ours in ONE process, their optimisation steps interleaved one by one (the order flipped at
    every step), ``--paired_epochs`` epochs of each stage, no validation: a drift of the machine's speed hits both
    alike (but each switch leaves the caches to the other model, likely costing the faster side more). Each side's first
    step of a stage is left out, as in the separate runs; our stage III includes its one-off export of the stage II
    features."""
    build = build_mister_e if system == "mister-e" else build_merits_l
    sides = {impl: build(impl, train, validation, args) for impl in ("reference", "ours")}
    stages = sides["ours"][1]
    out: dict = {}
    for stage in stages:
        prefix = "" if system == "mister-e" else f"{stage}_"
        made = {impl: side[2](stage) for impl, side in sides.items()}
        seconds = {impl: sides[impl][0].get(f"{stage}_export_seconds", 0.0) for impl in made}
        utterances = dict.fromkeys(made, 0)
        for epoch in range(args.paired_epochs):
            epoch_batches = {impl: batches(epoch) for impl, (_, _, batches) in made.items()}
            for i in range(max(len(b) for b in epoch_batches.values())):
                order = list(made) if i % 2 == 0 else list(reversed(list(made)))
                for impl in order:
                    if i >= len(epoch_batches[impl]):
                        continue
                    index = epoch_batches[impl][i]
                    start = time.perf_counter()
                    made[impl][0](index)
                    if epoch == 0 and i == 0:
                        continue  # the first step (allocations, optimiser state), left out
                    seconds[impl] += time.perf_counter() - start
                    utterances[impl] += sum(len(train[j]["labels"]) for j in index)
        for impl in made:
            out[f"{impl}/{prefix}paired_train_utterances_per_second"] = utterances[impl] / seconds[impl]
        out[f"{prefix}paired_speedup_ours_vs_reference"] = (
            out[f"ours/{prefix}paired_train_utterances_per_second"]
            / out[f"reference/{prefix}paired_train_utterances_per_second"])
        print(f"{system} {stage}: paired speed-up {out[f'{prefix}paired_speedup_ours_vs_reference']:.2f}",
              file=sys.stderr, flush=True)
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    train, validation = make_data(args)
    data_rss = rss_mb()
    if args.impl == "paired":
        print("RESULT " + json.dumps(run_paired(args.system, train, validation, args)), flush=True)
        return
    run = run_mister_e if args.system == "mister-e" else run_merits_l
    result = run(args.impl, train, validation, args)
    result.update(peak_rss_mb=peak_rss_mb(), rss_after_data_mb=data_rss)
    result["peak_rss_minus_data_mb"] = result["peak_rss_mb"] - data_rss
    print("RESULT " + json.dumps(result), flush=True)


DATA_OPTIONS = ("text_cue", "audio_cue", "signal", "noise")


def make_data(args) -> tuple[list[dict], list[dict]]:
    options = {name: getattr(args, name) for name in DATA_OPTIONS if getattr(args, name, None) is not None}
    train = synthetic_conversations(args.train_dialogues, args.dim, seed=args.seed, **options)
    validation = synthetic_conversations(args.validation_dialogues, args.dim, seed=args.seed + 1, **options)
    return train, validation


# ----------------------------------------------------------------------------------------------------- driver


def _command(system: str, impl: str, args) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--system", system, "--impl", impl,
               "--dim", str(args.dim), "--hidden", str(args.hidden), "--fusion_dim", str(args.fusion_dim),
               "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
               "--train_dialogues", str(args.train_dialogues), "--validation_dialogues", str(args.validation_dialogues),
               "--seed", str(args.seed), "--threads", str(args.threads),
               "--paired_epochs", str(_option(args, "paired_epochs", 0))] + (["--profile"] if args.profile else [])
    for name in ("merits_l_epochs", "moe_learning_rate") + DATA_OPTIONS:
        if _option(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    return command


def _collect(system: str, impl: str, started: tuple) -> dict:
    proc, out, err = started
    proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close()
    err.close()
    if proc.returncode == 0:
        os.unlink(err.name)
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system}/{impl} worker failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _start(system: str, impl: str, args) -> tuple:
    """A worker process; its output goes to temporary files (no pipe to fill while another worker is awaited)."""
    import tempfile

    out = tempfile.TemporaryFile("w+")
    err = tempfile.NamedTemporaryFile("w+", prefix=f"bench_training_{system}_{impl}_", suffix=".log", delete=False)
    print(f"[bench_training] {system} / {impl} ... (progress: {err.name})", flush=True)
    return subprocess.Popen(_command(system, impl, args), stdout=out, stderr=err, text=True, cwd=REPO), out, err


def launch(system: str, impl: str, args) -> dict:
    """Run one (system, implementation) in a fresh worker process and return its figures."""
    return _collect(system, impl, _start(system, impl, args))


RATE_SUFFIXES = ("train_utterances_per_second", "train_utterances_per_cpu_second")


def _merge_rounds(rounds: list[dict]) -> dict:
    """One worker's figures over several rounds: the first round's, with every throughput the mean over the rounds
    (and the rounds' values listed) and the peak memory the highest."""
    merged = dict(rounds[0])
    if len(rounds) > 1:
        for key in [k for k in merged if k.endswith(RATE_SUFFIXES)]:
            values = [r[key] for r in rounds]
            merged[key] = float(np.mean(values))
            merged[f"{key}_per_round"] = ",".join(f"{v:.1f}" for v in values)
        for key in ("peak_rss_mb", "peak_rss_minus_data_mb"):
            merged[key] = max(r[key] for r in rounds)
        merged["rounds"] = len(rounds)
    return merged


def launch_all(jobs: list[tuple[str, str]], args, parallel: int = 1) -> dict:
    """``{(system, impl): figures}``; ``parallel`` > 1 runs that many workers at once (accuracy only: their
    timings then share the CPUs and are not comparable). With ``args.rounds`` > 1 the jobs run that many times in
    alternating order (A B, B A, ...), so that a drift of the machine's speed cancels out of the ratios."""
    rounds = max(1, getattr(args, "rounds", 1))
    if parallel <= 1:
        collected: dict = {job: [] for job in jobs}
        for round_index in range(rounds):
            for job in (jobs if round_index % 2 == 0 else list(reversed(jobs))):
                collected[job].append(launch(*job, args))
        return {job: _merge_rounds(results) for job, results in collected.items()}
    results, running, pending = {}, [], list(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            running.append((job, _start(*job, args)))
        job, started = running.pop(0)
        results[job] = _collect(*job, started)
    return results


def _ratio(runs: dict, impl: str, key: str) -> float:
    return runs[impl][key] / runs["reference"][key]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--systems", default="mister-e,merits-l")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="MiSTER-E MoE epochs (and MERITS-L's without --merits_l_epochs)")
    parser.add_argument("--merits_l_epochs", type=int, default=MERITS_L_EPOCHS, help="epochs of each MERITS-L stage")
    parser.add_argument("--moe_learning_rate", type=float, default=MOE_LEARNING_RATE,
                        help="Adam learning rate of BOTH MiSTER-E implementations (0: each its paper's, 1e-5)")
    parser.add_argument("--random_order_variant", action="store_true",
                        help="MiSTER-E too: run ours without length grouping (MERITS-L always does)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--fusion_dim", type=int, default=1024)
    parser.add_argument("--train_dialogues", type=int, default=TRAIN_DIALOGUES)
    parser.add_argument("--validation_dialogues", type=int, default=VALIDATION_DIALOGUES)
    parser.add_argument("--text_cue", type=float, default=None, help="P(a turn's text cue is its emotion); default 0.8")
    parser.add_argument("--audio_cue", type=float, default=None, help="the same for speech; default 0.65")
    parser.add_argument("--signal", type=float, default=None, help="prototype scale (default 1.0)")
    parser.add_argument("--noise", type=float, default=None, help="per-turn noise scale (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--profile", action="store_true", help="add the top ops of a few profiled steps")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every worker N times in alternating order and average the throughputs")
    parser.add_argument("--paired_epochs", type=int, default=2,
                        help="epochs per stage of the interleaved timing of reference and ours in one process (0: skip)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="run N workers at once: for the accuracy figures only, the timings are then NOT comparable")
    parser.add_argument("--no_record", action="store_true", help="print, do not write bench/results.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.moe_learning_rate is not None and args.moe_learning_rate <= 0:
        args.moe_learning_rate = None
    if args.quick:
        args.dim, args.hidden, args.fusion_dim = 64, 16, 32
        args.train_dialogues, args.validation_dialogues, args.epochs, args.merits_l_epochs = 6, 3, 1, 1
    if args.worker:
        worker(args)
        return {}

    figures: dict = {}
    load_before = os.getloadavg()
    started = time.perf_counter()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    train, validation = make_data(args)
    for key, value in data_figures(train, validation).items():
        figures[f"data/{key}"] = value
    del train, validation
    jobs: list[tuple[str, str]] = []
    for system in systems:
        if system not in ("mister-e", "merits-l"):
            raise SystemExit(f"unknown system {system!r} (expected mister-e or merits-l)")
        impls = ["reference", "ours"]
        if system == "merits-l" or args.random_order_variant:
            impls.append("ours_random")
        jobs += [(system, impl) for impl in impls]
    all_runs = launch_all(jobs, args, args.parallel)
    paired = {}
    if args.paired_epochs > 0 and args.parallel <= 1:  # (with parallel workers no timing is comparable)
        for system in systems:
            paired[system] = launch(system, "paired", args)
    for system in systems:
        runs = {impl: result for (name, impl), result in all_runs.items() if name == system}
        impls = [impl for impl in runs if impl != "reference"]
        for impl, result in runs.items():
            for key, value in result.items():
                figures[f"{system}/{impl}/{key}"] = value
        stages = [""] if system == "mister-e" else ["context_", "fusion_"]
        for impl in impls:
            for stage in stages:
                figures[f"{system}/{stage}speedup_{impl}_vs_reference"] = _ratio(runs, impl, f"{stage}train_utterances_per_second")
                figures[f"{system}/{stage}speedup_{impl}_vs_reference_cpu_time"] = _ratio(
                    runs, impl, f"{stage}train_utterances_per_cpu_second")
                per_round = f"{stage}train_utterances_per_second_per_round"
                if per_round in runs[impl]:  # --rounds: the ratio of each round, and the least of them
                    ratios = [float(a) / float(b) for a, b in
                              zip(runs[impl][per_round].split(","), runs["reference"][per_round].split(","))]
                    figures[f"{system}/{stage}speedup_{impl}_vs_reference_per_round"] = ",".join(f"{r:.2f}" for r in ratios)
                    figures[f"{system}/{stage}speedup_{impl}_vs_reference_lowest_round"] = min(ratios)
            figures[f"{system}/memory_ratio_{impl}_vs_reference"] = (
                runs[impl]["peak_rss_minus_data_mb"] / runs["reference"]["peak_rss_minus_data_mb"])
            # accuracy parity: ours minus the reference, last epoch and best epoch (validation wF1)
            for key in [k for k in runs["reference"] if k.endswith("weighted_f1") and "best_" not in k]:
                best = key.replace("validation_", "best_validation_")
                for name in (key, best):
                    figures[f"{system}/{impl}_minus_reference/{name}"] = runs[impl][name] - runs["reference"][name]
    for system, result in paired.items():
        for key, value in result.items():
            figures[f"{system}/{key}"] = value
    figures["load_average_before"] = load_before[0]
    figures["load_average_after"] = os.getloadavg()[0]
    figures["wall_seconds"] = time.perf_counter() - started
    moe_optimiser = (f"BOTH MiSTER-E implementations with Adam lr {args.moe_learning_rate:g} (the papers' 1e-5 is for 100 "
                     f"epochs; {args.epochs} epoch(s) of {args.train_dialogues} dialogues is {args.epochs * -(-args.train_dialogues // args.batch_size)} "
                     "updates), clip 1.0" if args.moe_learning_rate else "each MiSTER-E implementation with its paper's Adam 1e-5")
    notes = (f"synthetic IEMOCAP-like cached embeddings: {args.train_dialogues} train / {args.validation_dialogues} validation "
             f"dialogues (20-110 turns, mean ~50, 6 sticky emotions, per-modality cues right with p text/speech "
             f"{args.text_cue or 0.8}/{args.audio_cue or 0.65}), dim {args.dim}, GRU hidden {args.hidden}, fusion d "
             f"{args.fusion_dim}, batch {args.batch_size} conversations; MiSTER-E {args.epochs} epoch(s), MERITS-L "
             f"{args.merits_l_epochs or args.epochs} epoch(s) per stage; {moe_optimiser}; MERITS-L: each its own AdamW 1e-4; "
             "ours = the trainer's sampler (length-grouped), ours_random = group_by_length false (the reference's "
             f"random batches); {args.threads} torch threads, each run in a fresh subprocess"
             + (f", {args.rounds} rounds in alternating order (throughputs averaged)" if args.rounds > 1 else "")
             + "; utt/s counts real utterances over the optimisation steps after the first (timed apart as "
             "first_step_seconds); the machine is shared, see load_average_*"
             + (f"; *paired_speedup_*: reference and ours in one process, steps interleaved one by one, "
                f"{args.paired_epochs} epoch(s) per stage, no validation (drift cancels; cold caches at every switch "
                "cost the faster side more)" if paired else ""))
    if args.parallel > 1:
        notes = (f"{args.parallel} WORKERS RAN AT ONCE: the accuracy figures hold, the timings and speed-ups are not "
                 "comparable. " + notes)
    if args.quick:
        notes = "QUICK smoke sizes, not a measurement. " + notes
    if not args.no_record:
        from bench.common import record

        name = "training" if sorted(systems) == ["merits-l", "mister-e"] else "training_" + "_".join(systems)
        record(name + ("_quick" if args.quick else ""), figures, notes)
    else:
        print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
