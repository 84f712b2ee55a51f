"""MERITS-L stage 0 as an experiment: dev weighted F1 of stage I / II with and without a text encoder pre-trained on
LLM pseudo-labels, over several seeds (README "Stage 0 on real pseudo-labels").

    python bench/bench_stage0.py --without OUT_S42,OUT_S1,OUT_S2 --with S0_S42,S0_S1,S0_S2 --stage0 STAGE0

Each folder is a finished ``train.py`` run of ``configs/meld_minilm_cpu.yaml`` (``--with`` runs add
``--text_encoder_init STAGE0/best``; the i-th folders of both lists share a seed). Records per run and per arm the
stage I and stage II dev weighted F1 (%), their means and sample standard deviations, and the paired differences
(with minus without, same seed); ``--stage0`` adds the stage 0 run's own validation figure (pseudo-label agreement on
its held-out 20 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402

STAGES = {"stage1": "validation_stage1_text_weighted_f1", "stage2": "validation_stage2_text_weighted_f1"}


def read_run(folder: str) -> dict:
    results_file = Path(folder) / "all_results.json"
    if not results_file.is_file():
        raise SystemExit(f"{results_file} does not exist (is the run finished?)")
    results = json.loads(results_file.read_text())
    options = yaml.safe_load((Path(folder) / "run_config.yaml").read_text())
    return {"seed": options.get("seed"), "text_encoder_init": options.get("text_encoder_init"),
            **{stage: 100 * results[key] for stage, key in STAGES.items()}}


def compare(without: list[dict], with_: list[dict]) -> dict:
    figures: dict = {}
    for arm, runs in (("without_stage0", without), ("with_stage0", with_)):
        figures[f"{arm}/seeds"] = [r["seed"] for r in runs]
        for stage in STAGES:
            values = [r[stage] for r in runs]
            figures[f"{arm}/{stage}_dev_weighted_f1"] = [round(v, 2) for v in values]
            figures[f"{arm}/{stage}_mean"] = round(statistics.mean(values), 2)
            figures[f"{arm}/{stage}_std"] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    for stage in STAGES:
        differences = [w[stage] - o[stage] for w, o in zip(with_, without)]
        figures[f"difference/{stage}_paired"] = [round(d, 2) for d in differences]
        figures[f"difference/{stage}_mean"] = round(statistics.mean(differences), 2)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--without", required=True, help="comma-separated run folders without stage 0")
    parser.add_argument("--with", dest="with_", required=True, help="comma-separated run folders with stage 0 (same seeds)")
    parser.add_argument("--stage0", default=None, help="the stage 0 run folder")
    parser.add_argument("--name", default="stage0_meld_minilm")
    parser.add_argument("--notes", default="")
    args = parser.parse_args(argv)
    without = [read_run(f) for f in args.without.split(",")]
    with_ = [read_run(f) for f in args.with_.split(",")]
    if len(without) != len(with_) or [r["seed"] for r in without] != [r["seed"] for r in with_]:
        raise SystemExit(f"--without and --with must list runs of the same seeds in the same order "
                         f"({[r['seed'] for r in without]} vs {[r['seed'] for r in with_]})")
    if any(r["text_encoder_init"] for r in without) or not all(r["text_encoder_init"] for r in with_):
        raise SystemExit("--without runs must not use text_encoder_init, --with runs must")
    figures = compare(without, with_)
    if args.stage0:
        stage0 = json.loads((Path(args.stage0) / "all_results.json").read_text())
        figures["stage0/pseudo_label_validation_weighted_f1"] = round(100 * stage0["validation_weighted_f1"], 2)
    record(args.name, figures, args.notes)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
