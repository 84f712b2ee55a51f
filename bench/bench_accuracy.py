"""Accuracy on the real data we have, our trainer's CPU configs vs classical baselines, side by side.

    python bench/bench_accuracy.py                      # every task below (tens of minutes on 2 cores)
    python bench/bench_accuracy.py --tasks meld,mosi    # a subset
    python bench/bench_accuracy.py --baselines_only     # only the baselines (minutes)
    python bench/bench_accuracy.py --trainer_output meld=/tmp/runs/meld   # score a run made elsewhere
    python bench/bench_accuracy.py --quick              # smoke: baselines on small slices

Tasks:

- ``meld``: MELD 7-class emotion, text only, scored on dev. Ours: ``train.py --config
  configs/meld_text_cpu.yaml`` (stage I utterance encoder, stage II context). Baseline: TF-IDF +
  logistic regression fit on train, C tuned on dev (``bench/baselines.py``; optimistic for the baseline).
- ``mosi``: CMU-MOSI binary sentiment (score < 0 negative), text only, dev. Same pair.
- ``emodb``: EmoDB speech, leave-one-speaker-out over its 8 speakers, weighted F1 and UAR. Ours:
  ``configs/emodb_speech_cpu.yaml`` when present. Baseline: MFCC statistics (numpy) + linear SVM,
  C chosen by a nested leave-speaker-out.
- ``demo``: the built-in synthetic corpus, both systems, every stage (``configs/demo.yaml``),
  validation accuracy of each stage against ``merits.data.demo.bayes_optimal_accuracy``.

Each trainer run is a subprocess ``python train.py --config ... --output_dir OUT --report_to none``
(the same code ``accelerate launch train.py`` runs on one process); its ``OUT/all_results.json`` is
read back and every validation figure recorded. Reruns resume: a finished trainer stage is not redone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import baselines  # noqa: E402


def shared_data() -> Path:
    return Path(os.environ.get("MERITS_SHARED_DATA", REPO.parent / "shared" / "data"))


# ----------------------------------------------------------------------------------------------------- trainer


def run_trainer(config: str, output_dir: Path, overrides: list[str], log_dir: Path) -> dict:
    """``python train.py --config CONFIG --output_dir OUT [overrides]``; returns ``OUT/all_results.json``."""
    if not (REPO / config).is_file():
        raise FileNotFoundError(f"{config}: the trainer config is missing")
    command = [sys.executable, "train.py", "--config", config, "--output_dir", str(output_dir), "--report_to", "none"]
    if (output_dir / "all_results.json").exists():
        return json.loads((output_dir / "all_results.json").read_text())
    if output_dir.exists():
        command.append("--resume")  # a killed earlier run: continue it
    command += overrides
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{output_dir.name}.log"
    print(f"[bench_accuracy] {' '.join(command)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"train.py --config {config} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    results = json.loads((output_dir / "all_results.json").read_text())
    results["_wall_seconds"] = time.perf_counter() - start
    return results


def output_dir(args, task: str) -> Path:
    """The trainer output folder of ``task``: ``--trainer_output task=DIR`` (a finished or killed run), else WORK_DIR/task."""
    for spec in args.trainer_output or []:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--trainer_output expects TASK=DIR, got {spec!r}")
        if name == task:
            return Path(folder)
    return args.work_dir / task


def validation_figures(results: dict, prefix: str) -> dict:
    """Every validation weighted F1 / accuracy / UAR the trainer wrote, under ``prefix``."""
    out = {}
    for key, value in sorted(results.items()):
        if key.startswith("validation") and isinstance(value, (int, float)) and re.search(r"(weighted_f1|accuracy|uar)$", key):
            out[f"{prefix}/ours/{key}"] = float(value)
    if "_wall_seconds" in results:
        out[f"{prefix}/ours/train_wall_seconds"] = results["_wall_seconds"]
    return out


def stage_value(results: dict, stage_words: tuple[str, ...], metric: str = "weighted_f1", modality: str = "text") -> float | None:
    """The validation ``metric`` of a stage (key names 'stage1'/'utterance', 'stage2'/'context', ...)."""
    candidates = [
        (key, value) for key, value in results.items()
        if key.startswith("validation") and key.endswith(metric) and any(w in key for w in stage_words)
        and ("audio" not in key or modality == "audio")
    ]
    if not candidates:
        return None
    candidates.sort(key=lambda kv: (modality not in kv[0], len(kv[0])))
    return float(candidates[0][1])


# ----------------------------------------------------------------------------------------------------- tasks


def task_text(name: str, args) -> tuple[dict, list[str]]:
    """MELD or MOSI: trainer stage I / II vs TF-IDF + LR on dev."""
    figures, checks = {}, []
    data = shared_data() / name
    if name == "meld":
        from merits.data.meld import load_meld

        corpus = load_meld(data, label="emotion", with_audio=False)
        config = "configs/meld_text_cpu.yaml"
    else:
        from merits.data.mosi import load_mosi

        corpus = load_mosi(data, with_audio=False)
        config = "configs/mosi_text_cpu.yaml"
    train, dev = corpus["train"], corpus["validation"]
    if args.quick:
        train = train.select(range(min(300, len(train))))
        dev = dev.select(range(min(100, len(dev))))
    base = baselines.tfidf_logreg(train["text"], train["label"], dev["text"], dev["label"], C=1.0 if args.quick else None)
    for key, value in base.items():
        figures[f"{name}/tfidf_logreg/{key}"] = value
    if args.quick or args.baselines_only:
        return figures, checks
    results = run_trainer(config, output_dir(args, name), ["--data_dir", str(data)], args.work_dir / "logs")
    figures[f"{name}/ours/trainer_output_dir"] = str(output_dir(args, name))
    figures.update(validation_figures(results, name))
    stage1 = stage_value(results, ("stage1", "utterance"))
    stage2 = stage_value(results, ("stage2", "context"))
    figures[f"{name}/ours/stage1_weighted_f1"] = stage1
    figures[f"{name}/ours/stage2_weighted_f1"] = stage2
    for stage, value in (("stage1", stage1), ("stage2", stage2)):
        if value is not None:  # > 0: above the dev-tuned TF-IDF + LR; < 0: the shortfall
            figures[f"{name}/ours_minus_tfidf_logreg/{stage}_weighted_f1"] = round(value - base["weighted_f1"], 4)
    if stage1 is not None and stage2 is not None:
        ok = stage2 > stage1 > base["weighted_f1"]
        figures[f"{name}/ours/stage2_minus_stage1_weighted_f1"] = round(stage2 - stage1, 4)
        figures[f"{name}/target_stage2_gt_stage1_gt_tfidf"] = ok
        checks.append(f"{name}: stage II {stage2:.4f} > stage I {stage1:.4f} > TF-IDF+LR {base['weighted_f1']:.4f}: "
                      f"{'met' if ok else 'MISSED'} (stage I {stage1 - base['weighted_f1']:+.4f}, "
                      f"stage II {stage2 - base['weighted_f1']:+.4f} vs TF-IDF+LR)")
    return figures, checks


def emodb_features(data: Path, acoustic: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
    """EmoDB utterance vectors: the baseline's MFCC statistics, or (``acoustic``) our extractor's statistics."""
    import csv

    from merits.data.audio import load_audio
    from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor

    rows = list(csv.DictReader(open(data / "labels.csv")))
    if not rows:
        raise ValueError(f"{data / 'labels.csv'}: no rows")
    describe = MeritsAcousticFeatureExtractor().extract if acoustic else baselines.mfcc_statistics
    features = []
    for index, row in enumerate(rows):
        path = data / row["file"]
        try:
            features.append(describe(load_audio(str(path), sampling_rate=16000)))
        except Exception as error:  # name the row and the file
            raise ValueError(f"{data / 'labels.csv'} row {index + 2} ({path}): {error}") from error
    return np.stack(features), [r["emotion"] for r in rows], [r["speaker"] for r in rows]


def task_emodb(args) -> tuple[dict, list[str]]:
    """EmoDB, leave-one-speaker-out: our speech head (trainer) vs MFCC + linear SVM, and our statistics + the same SVM."""
    figures, checks = {}, []
    data = shared_data() / "emodb"
    features, labels, speakers = emodb_features(data)
    if args.quick:
        keep = [i for i, s in enumerate(speakers) if s in sorted(set(speakers))[:3]]
        features, labels, speakers = features[keep], [labels[i] for i in keep], [speakers[i] for i in keep]
    base = baselines.speaker_independent_svm(features, labels, speakers, C=0.01 if args.quick else None)
    for key, value in base.items():
        figures[f"emodb/mfcc_svm/{key}"] = value
    if not args.quick:
        # the same nested-C linear SVM on MeritsAcousticFeatureExtractor statistics (an eGeMAPS-like baseline)
        acoustic, _, _ = emodb_features(data, acoustic=True)
        figures["emodb/acoustic_svm/feature_size"] = int(acoustic.shape[1])
        for key, value in baselines.speaker_independent_svm(acoustic, labels, speakers).items():
            figures[f"emodb/acoustic_svm/{key}"] = value
    if args.quick or args.baselines_only:
        return figures, checks
    config = "configs/emodb_speech_cpu.yaml"
    if not (REPO / config).is_file():
        figures["emodb/ours"] = f"not run: {config} does not exist yet"
        checks.append(f"emodb: ours not run ({config} missing)")
        return figures, checks
    results = run_trainer(config, output_dir(args, "emodb"), ["--data_dir", str(data)], args.work_dir / "logs")
    figures["emodb/ours/trainer_output_dir"] = str(output_dir(args, "emodb"))
    # The honest figures are the held-out speakers' (`loso_*`): the `validation_*` keys score the speakers
    # each fold selected its candidate and epoch on, which is optimistic.
    for key in ("loso_stage1_audio_weighted_f1", "loso_stage1_audio_unweighted_average_recall", "loso_stage1_audio_accuracy",
                "validation_stage1_audio_weighted_f1", "fold_candidates", "fold_chosen_candidates", "selected_candidate",
                "final_epochs"):
        if key in results:
            figures[f"emodb/ours/{key}"] = results[key]
    if "_wall_seconds" in results:
        figures["emodb/ours/train_wall_seconds"] = results["_wall_seconds"]
    ours = results.get("loso_stage1_audio_weighted_f1")
    ours_uar = results.get("loso_stage1_audio_unweighted_average_recall")
    if ours is not None:
        figures["emodb/ours_minus_mfcc_svm/weighted_f1"] = round(ours - base["weighted_f1"], 4)
        if ours_uar is not None:
            figures["emodb/ours_minus_mfcc_svm/uar"] = round(ours_uar - base["uar"], 4)
        ok = ours >= base["weighted_f1"] + 0.05
        figures["emodb/target_5_points_above_baseline"] = ok
        checks.append(f"emodb: ours wF1 {ours:.4f} / UAR {ours_uar if ours_uar is not None else float('nan'):.4f} vs MFCC+SVM "
                      f"{base['weighted_f1']:.4f} / {base['uar']:.4f} (wF1 +0.05 needed, got {ours - base['weighted_f1']:+.4f}): "
                      f"{'met' if ok else 'MISSED'}")
    return figures, checks


def task_demo(args) -> tuple[dict, list[str]]:
    """Both systems, every stage on the demo corpus vs the Bayes-optimal accuracy of its validation split."""
    import yaml

    from merits.data.demo import bayes_optimal_table, make_demo_corpus

    figures, checks = {}, []
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    options = config.get("dataset_options", {}) or {}
    overrides: list[str] = []
    if args.quick:
        options = {**options, "num_dialogues": 24}
        overrides = ["--dataset_options", json.dumps(options)]
        for stage in ("utterance", "context", "fusion", "moe"):
            overrides += [f"--{stage}.num_epochs", "1"]
    corpus = make_demo_corpus(num_dialogues=int(options.get("num_dialogues", 200)), seed=int(options.get("seed", 0)), with_audio=False)
    for key, value in bayes_optimal_table(corpus["validation"]).items():
        figures[f"demo/bayes_optimal_accuracy/{key}"] = value
    results = run_trainer("configs/demo.yaml", output_dir(args, "demo_quick" if args.quick else "demo"), overrides, args.work_dir / "logs")
    for key, value in sorted(results.items()):
        if key.startswith(("merits_l_validation", "mister_e_validation", "validation")) and key.endswith(("accuracy", "weighted_f1")):
            figures[f"demo/ours/{key}"] = float(value)
    if "_wall_seconds" in results:
        figures["demo/ours/train_wall_seconds"] = results["_wall_seconds"]
    best = figures.get("demo/bayes_optimal_accuracy/context_both")
    finals = {k: v for k, v in figures.items() if k.startswith("demo/ours/") and k.endswith("accuracy")}
    if best is not None and finals:
        top_key = max(finals, key=finals.get)
        checks.append(f"demo: best stage accuracy {finals[top_key]:.4f} ({top_key}) vs Bayes-optimal (context, both) {best:.4f}")
    return figures, checks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="meld,mosi,emodb,demo")
    parser.add_argument("--work_dir", type=Path, default=Path(os.environ.get("MERITS_BENCH_WORK_DIR", Path.home() / ".cache" / "merits" / "bench")) / "accuracy",
                        help="trainer output folders, outside the repo (reruns resume from them; env MERITS_BENCH_WORK_DIR)")
    parser.add_argument("--trainer_output", action="append", metavar="TASK=DIR",
                        help="read (or resume) the trainer run of TASK in DIR instead of WORK_DIR/TASK; repeatable")
    parser.add_argument("--baselines_only", action="store_true", help="fit and record the baselines, skip the trainer")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if (args.quick or args.baselines_only) and args.tasks == parser.get_default("tasks"):
        tasks = ["meld", "mosi", "emodb"]
    data = shared_data()
    figures: dict = {"load_average_before": os.getloadavg()[0]}
    checks: list[str] = []
    for task in tasks:
        if task in ("meld", "mosi", "emodb") and not (data / task).is_dir():
            figures[f"{task}/skipped"] = f"{data / task} not found (set MERITS_SHARED_DATA)"
            continue
        if task in ("meld", "mosi"):
            f, c = task_text(task, args)
        elif task == "emodb":
            f, c = task_emodb(args)
        elif task == "demo":
            f, c = task_demo(args)
        else:
            raise SystemExit(f"unknown task {task!r} (expected meld, mosi, emodb, demo)")
        figures.update(f)
        checks += c
    figures["load_average_after"] = os.getloadavg()[0]
    notes = " | ".join(checks) or "baselines only"
    if args.quick:
        notes = "QUICK smoke slices, not a measurement. " + notes
    if not args.no_record:
        from bench.common import record

        name = "accuracy_quick" if args.quick else "accuracy" + ("" if tasks == ["meld", "mosi", "emodb", "demo"] else "_" + "_".join(tasks))
        if args.baselines_only and not args.quick:
            name = "accuracy_baselines"
        record(name, figures, notes)
    else:
        print(json.dumps(figures, indent=2))
    for line in checks:
        print(line)
    return figures


if __name__ == "__main__":
    main()
