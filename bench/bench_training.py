"""Stage II/III (MERITS-L) and MoE (MiSTER-E) training on cached embeddings: ours vs the reference loops.

    python bench/bench_training.py            # full run (IEMOCAP-like sizes, a few minutes per system)
    python bench/bench_training.py --quick    # tiny sizes: exercises every code path in seconds

What it measures, for each system and implementation, each in a FRESH subprocess (so the peak RSS
is that run's own high-water mark, read with ``resource.getrusage``; tracemalloc cannot see torch):

- training throughput in real (non-padded) utterances per second, counting only the optimisation
  steps (forward, loss, backward, clip, step) - evaluation is timed apart - and per CPU-second of the
  process (load-independent on a shared machine);
- peak resident memory (``ru_maxrss``) and the same minus the RSS right after the data was built;
- validation weighted F1 (padding dropped) after the same number of epochs.

Implementations:

- ``reference``: ``bench/reference`` (faithful to the authors' loops: zero-padded batches, no packing,
  no masks, losses over padded rows; MiSTER-E Adam 1e-5 / clip 1.0, MERITS-L AdamW 1e-4).
- ``ours``: ``merits.MeritsForConversationClassification`` driven exactly as the trainer drives it
  (``merits.data.FeatureCollator`` on the trainer's row conversations, ``merits.training.loop.build_optimizer`` with the
  trainer's stage defaults, random conversation order as the trainer's sampler), batch 8.
- ``ours_length_grouped`` (MiSTER-E only): the same, with conversations of similar length batched
  together; it measures what a length-grouped sampler in the trainer would buy.

Data: synthetic IEMOCAP-like conversations (150 train / 30 validation dialogues, 20-110 turns,
mean ~50, 6 classes with persistent emotions, 2048-d text and speech embeddings carrying a
class signal plus a per-dialogue offset and noise), generated from a seed inside each worker.
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
                            mean_turns: float = 50.0, text_signal: float = 2.0, audio_signal: float = 1.5) -> list[dict]:
    """IEMOCAP-like conversations of cached embeddings, as the trainer's feature items.

    Lengths: ``min_turns`` + a gamma draw with mean ``mean_turns - min_turns``, clipped to ``max_turns``.
    Labels follow a sticky Markov chain (stay with probability 0.7), so context helps. Each modality's
    embedding = signal * class direction + a per-dialogue offset + unit Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    class_rng = np.random.default_rng(1234)  # the class directions are the same for every split
    directions = {}
    for modality in ("text", "audio"):
        u = class_rng.standard_normal((NUM_CLASSES, dim))
        directions[modality] = u / np.linalg.norm(u, axis=1, keepdims=True)
    items = []
    for _ in range(num_dialogues):
        extra = mean_turns - min_turns
        length = int(min(max_turns, min_turns + rng.gamma(shape=2.0, scale=extra / 2.0)))
        labels = np.empty(length, dtype=np.int64)
        labels[0] = rng.integers(NUM_CLASSES)
        for t in range(1, length):
            labels[t] = labels[t - 1] if rng.random() < 0.7 else rng.integers(NUM_CLASSES)
        item = {"labels": labels}
        for modality, signal in (("text", text_signal), ("audio", audio_signal)):
            offset = 0.5 * rng.standard_normal(dim)
            x = signal * directions[modality][labels] + offset + rng.standard_normal((length, dim))
            item[f"{modality}_embeds"] = x.astype(np.float32)
            item[f"{modality}_mask"] = np.ones(length, dtype=np.int64)
        items.append(item)
    return items


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


def random_batches(items: list[dict], batch_size: int, seed: int) -> list[list[int]]:
    """The trainer's order: a fresh random permutation each epoch, cut into batches."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def length_grouped_batches(items: list[dict], batch_size: int, seed: int, group: int = 4) -> list[list[int]]:
    """Shuffle, sort by length inside chunks of ``group`` batches, cut, then shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    chunk = batch_size * group
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: -len(items[i]["labels"]))
        batches += [list(map(int, part[i : i + batch_size])) for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
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


def run_mister_e(impl: str, train, validation, args) -> dict:
    import torch

    result: dict = {}
    torch.manual_seed(args.seed)
    if impl == "reference":
        from bench.reference import mister_e as ref

        model = ref.ReferenceAttentionMoE(args.dim, NUM_CLASSES, hidden_dim=args.hidden, fusion_dim=args.fusion_dim)
        optimizer = ref.make_optimizer(model, lr=1e-5)

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
        from merits.training.arguments import TrainingArguments
        from merits.training.loop import build_optimizer
        from merits.data.collate import FeatureCollator

        config = MeritsConfig(architecture="mister-e", text_embed_dim=args.dim, audio_embed_dim=args.dim,
                              context_text_hidden_size=args.hidden, context_audio_hidden_size=args.hidden,
                              context_conv_channels=2 * args.hidden, fusion_hidden_size=args.fusion_dim,
                              id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, stage="moe")
        model = MeritsForConversationClassification(config)
        model.freeze_for_stage("moe")
        stage_args = TrainingArguments().moe
        optimizer = build_optimizer(model.parameters(), stage_args)
        result["optimizer"] = f"{stage_args.optimizer} lr {stage_args.learning_rate} clip {stage_args.max_grad_norm}"
        collate_features = FeatureCollator()
        train_rows, validation_rows = as_feature_rows(train), as_feature_rows(validation)

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
    result.update(_train_epochs(step, evaluate, train, impl, args))
    return result


def run_merits_l(impl: str, train, validation, args) -> dict:
    import torch

    result: dict = {}
    torch.manual_seed(args.seed)
    text_hidden, audio_hidden = args.hidden, max(1, args.hidden // 4)  # papers §6 #8: 512 text / 128 speech
    if impl == "reference":
        from bench.reference import merits_l as ref

        model = ref.ReferenceMeritsL(args.dim, args.dim, NUM_CLASSES, text_hidden, audio_hidden, args.fusion_dim)

        def make_stage(stage):
            optimizer = ref.make_optimizer(model, stage, lr=1e-4)

            def step(index):
                ref.train_step(model, optimizer, *_reference_tensors(train, index), stage=stage)

            def evaluate():
                scores = {}
                heads = [("text", "context"), ("audio", "context")] if stage == "context" else [("fusion", "fusion")]
                for name, _ in heads:
                    pred, gold = [], []
                    for i in range(len(validation)):
                        p, g = ref.predict(model, *_reference_tensors(validation, [i]), stage=stage, modality=name)
                        pred += p
                        gold += g
                    scores[f"validation_{name}_weighted_f1"] = weighted_f1(gold, pred)
                return scores

            return step, evaluate
    else:
        from merits import MeritsConfig, MeritsForConversationClassification
        from merits.training.arguments import TrainingArguments
        from merits.training.loop import build_optimizer
        from merits.data.collate import FeatureCollator

        config = MeritsConfig(architecture="merits-l", text_embed_dim=args.dim, audio_embed_dim=args.dim,
                              context_text_hidden_size=text_hidden, context_audio_hidden_size=audio_hidden,
                              fusion_hidden_size=args.fusion_dim,
                              id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, stage="context")
        model = MeritsForConversationClassification(config)
        defaults = TrainingArguments()
        collate_features = FeatureCollator()
        train_rows, validation_rows = as_feature_rows(train), as_feature_rows(validation)

        def make_stage(stage):
            model.freeze_for_stage(stage)
            stage_args = getattr(defaults, stage)
            optimizer = build_optimizer(model.parameters(), stage_args)

            def step(index):
                train_step(model, optimizer, collate_features([train_rows[i] for i in index]), stage, stage_args.max_grad_norm)

            def evaluate():
                model.eval()
                heads = {"text": "context_text_logits", "audio": "context_audio_logits"} if stage == "context" else {"fusion": "fusion_logits"}
                pred = {k: [] for k in heads}
                gold = []
                with torch.no_grad():
                    for start in range(0, len(validation), 8):
                        batch = collate_features(validation_rows[start : start + 8])
                        out = model(**batch, stage=stage)
                        keep = batch["labels"] >= 0
                        gold += batch["labels"][keep].tolist()
                        for name, attr in heads.items():
                            pred[name] += getattr(out, attr).argmax(-1)[keep].tolist()
                return {f"validation_{k}_weighted_f1": weighted_f1(gold, v) for k, v in pred.items()}

            return step, evaluate

    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    for stage in ("context", "fusion"):
        step, evaluate = make_stage(stage)
        for key, value in _train_epochs(step, evaluate, train, impl, args).items():
            result[f"{stage}_{key}"] = value
    return result


def _train_epochs(step, evaluate, train, impl: str, args) -> dict:
    group = impl.endswith("length_grouped")
    seconds, cpu_seconds, utterances, padded_ratio = 0.0, 0.0, 0, []
    for epoch in range(args.epochs):
        seed = args.seed * 1000 + epoch  # the same batches for every implementation
        batches = length_grouped_batches(train, args.batch_size, seed) if group else random_batches(train, args.batch_size, seed)
        padded_ratio.append(padding_ratio(train, batches))
        for index in batches:
            start, cpu = time.perf_counter(), time.process_time()
            step(index)
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu
            utterances += sum(len(train[i]["labels"]) for i in index)
    start = time.perf_counter()
    scores = evaluate()
    out = {
        "train_utterances_per_second": utterances / seconds,
        "train_seconds": seconds,
        # process CPU time (all threads): does not depend on the share of a loaded machine we got
        "train_utterances_per_cpu_second": utterances / cpu_seconds,
        "eval_seconds": time.perf_counter() - start,
        "padded_per_real_utterance": float(np.mean(padded_ratio)),
        **scores,
    }
    if args.profile:
        batches = random_batches(train, args.batch_size, 99) if not group else length_grouped_batches(train, args.batch_size, 99)
        it = itertools.cycle(batches)
        out["profile_top_ops"] = _profile_top(lambda: step(next(it)))
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    train = synthetic_conversations(args.train_dialogues, args.dim, seed=args.seed)
    validation = synthetic_conversations(args.validation_dialogues, args.dim, seed=args.seed + 1)
    data_rss = rss_mb()
    run = run_mister_e if args.system == "mister-e" else run_merits_l
    result = run(args.impl, train, validation, args)
    result.update(peak_rss_mb=peak_rss_mb(), rss_after_data_mb=data_rss)
    result["peak_rss_minus_data_mb"] = result["peak_rss_mb"] - data_rss
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------- driver


def launch(system: str, impl: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--system", system, "--impl", impl,
               "--dim", str(args.dim), "--hidden", str(args.hidden), "--fusion_dim", str(args.fusion_dim),
               "--epochs", str(args.epochs), "--batch_size", str(args.batch_size),
               "--train_dialogues", str(args.train_dialogues), "--validation_dialogues", str(args.validation_dialogues),
               "--seed", str(args.seed), "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    print(f"[bench_training] {system} / {impl} ...", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system}/{impl} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--systems", default="mister-e,merits-l")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--fusion_dim", type=int, default=1024)
    parser.add_argument("--train_dialogues", type=int, default=150)
    parser.add_argument("--validation_dialogues", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--profile", action="store_true", help="add the top ops of a few profiled steps")
    parser.add_argument("--no_record", action="store_true", help="print, do not write bench/results.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.hidden, args.fusion_dim = 64, 16, 32
        args.train_dialogues, args.validation_dialogues, args.epochs = 6, 3, 1
    if args.worker:
        worker(args)
        return {}

    figures: dict = {}
    load_before = os.getloadavg()[0]
    for system in [s.strip() for s in args.systems.split(",") if s.strip()]:
        if system not in ("mister-e", "merits-l"):
            raise SystemExit(f"unknown system {system!r} (expected mister-e or merits-l)")
        impls = ["reference", "ours", "ours_length_grouped"] if system == "mister-e" else ["reference", "ours"]
        runs = {impl: launch(system, impl, args) for impl in impls}
        for impl, result in runs.items():
            for key, value in result.items():
                figures[f"{system}/{impl}/{key}"] = value
        if system == "mister-e":
            ratio = runs["ours"]["train_utterances_per_second"] / runs["reference"]["train_utterances_per_second"]
            figures["mister-e/speedup_ours_vs_reference"] = ratio
            for impl in ("ours", "ours_length_grouped"):
                figures[f"mister-e/speedup_{impl}_vs_reference_cpu_time"] = (
                    runs[impl]["train_utterances_per_cpu_second"] / runs["reference"]["train_utterances_per_cpu_second"])
            figures["mister-e/speedup_ours_length_grouped_vs_reference"] = (
                runs["ours_length_grouped"]["train_utterances_per_second"] / runs["reference"]["train_utterances_per_second"])
            figures["mister-e/memory_ratio_ours_vs_reference"] = runs["ours"]["peak_rss_minus_data_mb"] / runs["reference"]["peak_rss_minus_data_mb"]
        else:
            for stage in ("context", "fusion"):
                key = f"{stage}_train_utterances_per_second"
                figures[f"merits-l/{stage}_speedup_ours_vs_reference"] = runs["ours"][key] / runs["reference"][key]
                key = f"{stage}_train_utterances_per_cpu_second"
                figures[f"merits-l/{stage}_speedup_ours_vs_reference_cpu_time"] = runs["ours"][key] / runs["reference"][key]
    figures["load_average_before"] = load_before
    figures["load_average_after"] = os.getloadavg()[0]
    notes = (f"synthetic IEMOCAP-like cached embeddings: {args.train_dialogues} train / {args.validation_dialogues} validation "
             f"dialogues (20-110 turns, mean ~50), dim {args.dim}, GRU hidden {args.hidden}, fusion d {args.fusion_dim}, "
             f"batch {args.batch_size} conversations, {args.epochs} epoch(s) per stage, {args.threads} torch threads, "
             "each run in a fresh subprocess; utt/s counts real utterances over optimisation steps only; "
             "the machine is shared, see load_average_*")
    if args.quick:
        notes = "QUICK smoke sizes, not a measurement. " + notes
    if not args.no_record:
        from bench.common import record

        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        name = "training" if sorted(systems) == ["merits-l", "mister-e"] else "training_" + "_".join(systems)
        record(name + ("_quick" if args.quick else ""), figures, notes)
    else:
        print(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
