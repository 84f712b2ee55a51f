# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""The ``merits`` command: prediction and evaluation with a trained model folder.

```
merits predict  --model DIR INPUT.jsonl -o OUT.jsonl [--batch-size 8] [--asr-model NAME] [--bf16] [--overwrite]
merits evaluate --model DIR --dataset {meld,mosi,iemocap,emodb,features} --file PATH [--split test]
                [--drop-modality speech|text [--drop-probability P] [--drop-mode mask|zero]]
```

``predict`` reads one conversation per line: either a JSON list of turns or an object with a
``turns`` list (its other keys, e.g. ``id``, are copied to the output). A turn is
``{"text": ..., "audio": "path.wav"}`` (relative audio paths are resolved against the input
file's folder). Each output line is ``{"line": N, ..., "predictions": [one dict per turn]}``.
Output is flushed batch by batch; rerunning the same command skips the lines already written, after checking
(``OUT.resume.json``, :mod:`merits.resume`) that the model, the settings and every input line already predicted are
unchanged (``--overwrite`` starts again). A bad line (not JSON, not UTF-8, a bad turn) does not stop the others: it is
named on stderr (``IN line 2, turn 3: ...``, lines and turns counted from 1), left out, and the exit status is 1; a
rerun tries it again; ``--skip-errors`` records it as ``{"line": N, "error": ...}`` and exits 0. See
docs/reliability.md.

``evaluate`` loads a labelled file with the loaders of :mod:`merits.data`, maps its label names
through the model's ``label2id`` and prints ONE JSON object with ``weighted_f1`` and ``accuracy``
(fractions in [0, 1]), per-class F1, counts and the metric backend used.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

DATASETS = ("meld", "mosi", "iemocap", "emodb", "features")


class CliError(Exception):
    """A user error: printed as ``merits: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------------------------
# Loading a model folder
# ----------------------------------------------------------------------------------------------


def load_model_and_processor(model_dir: str, dtype: str | None = None, trust_remote_code: bool | None = None):
    """``(model, processor or None)`` from a folder written by ``save_pretrained`` / ``train.py``.

    Code named by the folder's tokenizer / feature extractor config runs only with ``trust_remote_code=True``
    (``--trust-remote-code``)."""
    import torch

    from merits.modeling_merits import MeritsForConversationClassification
    from merits.processing_merits import MeritsProcessor

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise CliError(f"--model {model_dir}: no config.json there; expected a folder written by train.py (OUT/best/).")
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        model = MeritsForConversationClassification.from_pretrained(str(path), **kwargs)
    except Exception as error:  # a truncated / corrupt weights file, an unreadable config: one clear line
        weights = sorted(p.name for p in path.glob("*.safetensors")) or sorted(p.name for p in path.glob("*.bin"))
        raise CliError(
            f"--model {model_dir}: cannot load the model from {', '.join(weights) or 'this folder'} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); the file may be truncated or "
            "corrupt (an interrupted copy or download?): copy the model folder again."
        ) from None
    model.eval()
    processor = None
    if (path / "processor_config.json").is_file():
        try:
            processor = MeritsProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except ValueError as error:
            if "trust_remote_code" in str(error):
                raise CliError(
                    f"--model {model_dir}: its tokenizer / feature extractor config names Python code in that folder; "
                    "it is not run unless you pass --trust-remote-code (only for a folder you trust)."
                ) from None
            raise
    return model, processor


def build_pipeline(model_dir: str, asr_model: str | None = None, bf16: bool = False, batch_size: int = 8,
                   trust_remote_code: bool | None = None):
    from merits.pipeline_merits import ConversationEmotionRecognitionPipeline

    model, processor = load_model_and_processor(model_dir, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"batch_size": batch_size}
    if asr_model:
        kwargs["asr_model"] = asr_model
    if bf16:
        kwargs["bf16"] = True
    classifier = ConversationEmotionRecognitionPipeline(
        model=model, processor=processor, task="conversation-emotion-recognition", device=-1,
        trust_remote_code=trust_remote_code, **kwargs
    )
    # messages in the command's terms: the flag, and turns counted from 1 like the input's lines
    classifier.asr_hint = "pass --asr-model NAME (a transformers ASR checkpoint, e.g. openai/whisper-small) to transcribe its audio"
    classifier.describe_turn = lambda conversation, turn: f"turn {turn + 1}"
    return classifier


# ----------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------


def _read_conversations(input_path: Path) -> Iterator[tuple[int, list | None, dict, str | None]]:
    """``(line number, turns, other keys, error)`` for every non-blank line; audio paths made absolute.

    A line that is not a conversation yields ``(line, None, {}, message)``: it is reported, the others go on."""
    base = input_path.resolve().parent
    with open(input_path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, None, {}, f"not UTF-8 text (byte {error.start + 1} of the line)"
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, None, {}, f"not valid JSON ({error.msg} at column {error.colno})"
                continue
            if isinstance(record, dict):
                if "turns" not in record:
                    yield line_number, None, {}, f"an object line needs a 'turns' list (got keys {sorted(record)})"
                    continue
                turns, extra = record["turns"], {k: v for k, v in record.items() if k != "turns"}
            else:
                turns, extra = record, {}
            if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
                yield line_number, None, {}, "a conversation must be a list of turn objects"
                continue
            if not turns:
                yield line_number, None, {}, "the conversation is empty (no turns)"
                continue
            for turn in turns:
                audio = turn.get("audio")
                if isinstance(audio, str) and not os.path.isabs(audio):
                    turn["audio"] = str(base / audio)
                elif isinstance(audio, dict) and isinstance(audio.get("path"), str) and not os.path.isabs(audio["path"]):
                    turn["audio"] = {**audio, "path": str(base / audio["path"])}
            yield line_number, turns, extra, None


def _completed_lines(output_path: Path) -> list[int]:
    """Input line numbers already in ``output_path``; a torn last line (interrupted write) is cut off."""
    if not output_path.exists():
        return []
    data = output_path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(output_path, "r+b") as handle:
            handle.truncate(len(complete))
    done = []
    for index, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.append(int(json.loads(line)["line"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise CliError(
                f"{output_path} line {index} is not a merits prediction record; refusing to resume into it "
                "(remove the file or choose another -o)."
            ) from None
    return done


def _line_fingerprints(input_path: Path) -> dict[str, str]:
    """``{line number: sha256 of its bytes}`` of every non-blank line (what a resume compares)."""
    import hashlib

    with open(input_path, "rb") as handle:
        return {str(number): hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:16]
                for number, raw in enumerate(handle, start=1) if raw.strip()}


def _line_error(input_path: Path, line_number: int, error: Exception | str) -> str:
    message = str(error)
    joiner = ", " if message.startswith("turn ") else ": "
    return f"{input_path} line {line_number}{joiner}{message}"


def predict(args) -> int:
    from tqdm.auto import tqdm

    from merits.resume import check_manifest, fingerprint_path, read_manifest

    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise CliError(f"{input_path}: input file not found.")
    if output_path.is_dir():
        raise CliError(f"-o {output_path} is a folder; give the output file, e.g. -o {output_path / 'predictions.jsonl'}.")
    manifest = output_path.with_name(output_path.name + ".resume.json")
    if args.overwrite:
        output_path.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
    has_output = output_path.is_file() and output_path.stat().st_size > 0
    lines = _line_fingerprints(input_path)
    if has_output:
        # every conversation already predicted must come from the same input line as then (lines may be added
        # or fixed after the last written one; a bad line fixed and the command rerun is the usual case)
        previous = read_manifest(manifest) or {}
        old_lines = previous.get("lines", {})
        changed = sorted(n for n in _completed_lines(output_path) if old_lines.get(str(n)) != lines.get(str(n)))
        if changed and previous:
            raise CliError(
                f"cannot resume {output_path}: input line(s) {changed[:5]}{'...' if len(changed) > 5 else ''} of "
                f"{input_path} changed since their predictions were written (the input was edited or replaced); pass "
                f"--overwrite to start {output_path} again, or choose another -o."
            )
    # what the output is made from: a resumed run must have the same model and settings
    check_manifest(
        manifest, "merits predict",
        inputs={"model": fingerprint_path(args.model)},
        settings={"asr_model": args.asr_model, "bf16": bool(args.bf16)},
        has_output=has_output,
        what=str(output_path),
        restart_hint=f"pass --overwrite to start {output_path} again, or choose another -o",
        extra={"input": str(input_path.resolve()), "lines": lines},
    )
    conversations = list(_read_conversations(input_path))
    done = set(_completed_lines(output_path))
    todo = [item for item in conversations if item[0] not in done]
    errors: list[str] = []
    written = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    good = [item for item in todo if item[3] is None]
    classifier = None
    if good:
        classifier = build_pipeline(args.model, asr_model=args.asr_model, bf16=args.bf16, batch_size=args.batch_size,
                                    trust_remote_code=args.trust_remote_code)
    with open(output_path, "a", encoding="utf-8") as out, tqdm(
        total=len(conversations), initial=len(conversations) - len(todo), unit="conv", desc="merits predict",
        disable=args.quiet,
    ) as progress:

        def write(line_number, extra, prediction=None, error=None):
            nonlocal written
            record = {"line": line_number, **extra}
            if error is not None:
                errors.append(error)
                if not args.skip_errors:
                    return
                record["error"] = error
            else:
                record["predictions"] = prediction
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1

        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            runnable = [item for item in chunk if item[3] is None]
            predictions: dict[int, Any] = {}
            if runnable:
                try:
                    outputs = classifier([turns for _, turns, _, _ in runnable], batch_size=args.batch_size)
                    predictions = {line: output for (line, _, _, _), output in zip(runnable, outputs)}
                except (ValueError, TypeError, FileNotFoundError, RuntimeError):
                    # one line at a time, so that only the line at fault is left out and the error names it
                    for line_number, turns, _, _ in runnable:
                        try:
                            predictions[line_number] = classifier(turns)
                        except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
                            predictions[line_number] = _line_error(input_path, line_number, error)
            for line_number, _, extra, parse_error in chunk:
                if parse_error is not None:
                    write(line_number, extra, error=_line_error(input_path, line_number, parse_error))
                elif isinstance(predictions[line_number], str):
                    write(line_number, extra, error=predictions[line_number])
                else:
                    write(line_number, extra, prediction=predictions[line_number])
            out.flush()
            progress.update(len(chunk))
    for message in errors:
        print(f"merits predict: error: {message}", file=sys.stderr)
    total = len(done) + written
    print(
        f"merits predict: {output_path} holds {total} of {len(conversations)} conversations ({written} written now)"
        + (f"; {len(errors)} line(s) with errors" + (" recorded as {'error': ...}" if args.skip_errors else
           " left out (listed above): fix them and rerun the same command to add them, or pass --skip-errors")
           if errors else ""),
        file=sys.stderr,
    )
    return 1 if errors and not args.skip_errors else 0


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def _label_lookup(model_label2id: dict) -> dict:
    """Case-insensitive label name -> model class id."""
    return {str(name).strip().lower(): int(index) for name, index in model_label2id.items()}


def _map_label(name: Any, lookup: dict, model_labels: list, where: str) -> int:
    key = str(name).strip().lower()
    if key not in lookup:
        raise CliError(
            f"{where}: label {name!r} is not one of the model's labels {model_labels}; "
            "the file and the model do not use the same class set."
        )
    return lookup[key]




def _select_split(loaded, split: str | None, where: str):
    """One split of ``loaded`` (all of them concatenated when ``split`` is None): merits.data.select_split."""
    from merits.data import SplitError, select_split

    try:
        return select_split(loaded, split, where)
    except SplitError as error:
        raise CliError(str(error)) from None


def _load_labelled_dataset(dataset: str, file: str, split: str | None, model):
    """The rows to score, as a `datasets.Dataset` in the schema of :mod:`merits.data.schema`."""
    from merits import data

    path = Path(file)
    if not path.exists():
        raise CliError(f"--file {file}: not found.")
    where = f"{dataset} file {file}"
    if dataset not in data.SCORING_CORPORA:
        raise CliError(f"unknown dataset {dataset!r}")
    loaded = data.load_labelled_corpus(dataset, path, list(model.config.label2id), split)
    return _select_split(loaded, split, where)


def _load_feature_dataset(file: str, split: str | None):
    """A feature dataset (api.md §5): a `save_to_disk` folder (Dataset or DatasetDict) or parquet file(s)."""
    import datasets

    path = Path(file)
    if not path.exists():
        raise CliError(f"--file {file}: not found.")
    if path.is_dir() and any(path.glob("*.parquet")) and not (path / "dataset_info.json").exists() and not (
        path / "dataset_dict.json"
    ).exists():
        loaded = datasets.Dataset.from_parquet([str(p) for p in sorted(path.glob("*.parquet"))])
    elif path.is_file() and path.suffix == ".parquet":
        loaded = datasets.Dataset.from_parquet(str(path))
    else:
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as error:
            raise CliError(f"--file {file}: not a feature dataset saved with save_to_disk or parquet ({error}).") from error
    ds = _select_split(loaded, split, f"features {file}")
    missing = [c for c in ("dialogue_id", "turn", "label") if c not in ds.column_names]
    if missing:
        raise CliError(f"--file {file}: a feature dataset needs the columns {missing} (has {ds.column_names}).")
    if "text_embeds" not in ds.column_names and "audio_embeds" not in ds.column_names:
        raise CliError(f"--file {file}: a feature dataset needs 'text_embeds' and/or 'audio_embeds' columns.")
    return ds


def _gold_ids(ds, model, where: str) -> list[int]:
    """Gold class ids in the model's numbering (-100 for unlabelled rows), mapped by label name."""
    names = getattr(ds.features["label"], "names", None)
    model_labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    lookup = _label_lookup(model.config.label2id)
    gold = []
    for row, value in enumerate(ds["label"]):
        if value is None or (isinstance(value, int) and value < 0):
            gold.append(-100)
            continue
        name = names[value] if names is not None and isinstance(value, int) else value
        if names is None and isinstance(value, int):
            # plain integer labels without names: taken as the model's ids
            if not 0 <= value < len(model_labels):
                raise CliError(f"{where}, row {row}: label id {value} is outside the model's {len(model_labels)} classes.")
            gold.append(int(value))
            continue
        gold.append(_map_label(name, lookup, model_labels, f"{where}, row {row}"))
    return gold


def _predict_raw(model_dir: str, ds, args, where: str) -> tuple[list[int], list[int]]:
    """Run the pipeline over the conversations of a raw dataset; returns (predictions, references)."""
    import numpy as np
    from tqdm.auto import tqdm

    from merits.data import conversation_indices

    classifier = build_pipeline(model_dir, asr_model=args.asr_model, bf16=args.bf16, batch_size=args.batch_size,
                                trust_remote_code=args.trust_remote_code)
    classifier.describe_turn = lambda conversation, turn: f"dialogue {batch[conversation][0]!r}, turn {turn}"
    model = classifier.model
    if classifier.feature_only:
        raise CliError(
            f"the model at {model_dir} has no text encoder and no speech encoder (it was trained on precomputed "
            f"embeddings): it can only be evaluated on a feature dataset, with --dataset features --file DIR."
        )
    gold = _gold_ids(ds, model, where)
    groups = conversation_indices(ds)
    texts = ds["text"] if "text" in ds.column_names else [None] * len(ds)
    audios = ds["audio"] if ("audio" in ds.column_names and classifier.reads_speech) else [None] * len(ds)
    label2id = model.config.label2id
    predictions, references = [], []
    batch = []

    def flush():
        conversations = [turns for _, turns in batch]
        try:
            outputs = classifier(conversations, batch_size=args.batch_size)
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise CliError(f"{where}: {error}") from error
        for (dialogue_id, rows), turns in zip(batch_rows, outputs):
            for row, turn in zip(rows, turns):
                predictions.append(int(label2id[turn["label"]]))
                references.append(gold[row])

    batch_rows = []
    for dialogue_id, rows in tqdm(groups, desc="merits evaluate", unit="conv", disable=args.quiet):
        turns = []
        for row in rows:
            text = texts[row] or None
            audio = audios[row]
            if isinstance(audio, dict) and not audio.get("path") and not (audio.get("array") is not None and len(audio["array"])):
                audio = None
            if isinstance(audio, dict) and audio.get("array") is not None and len(audio["array"]):
                audio = {"array": np.asarray(audio["array"], dtype=np.float32), "sampling_rate": audio["sampling_rate"]}
            if text is None and audio is None:
                raise CliError(f"{where}, row {row} (dialogue {dialogue_id!r}): the turn has neither text nor audio.")
            turns.append({"text": text, "audio": audio})
        batch.append((dialogue_id, turns))
        batch_rows.append((dialogue_id, rows))
        if len(batch) == args.batch_size:
            flush()
            batch, batch_rows = [], []
    if batch:
        flush()
    return predictions, references


def _predict_features(model_dir: str, ds, args, where: str) -> tuple[list[int], list[int]]:
    """Run the model's context/fusion/gate part over a feature dataset (precomputed utterance embeddings)."""
    import torch
    from tqdm.auto import tqdm

    from merits.data import conversation_indices
    from merits.processing_merits import check_finite

    model, _ = load_model_and_processor(model_dir, trust_remote_code=args.trust_remote_code)
    config = model.config
    if config.stage == "utterance":
        raise CliError(f"the model at {model_dir} is a Stage I (utterance) model: it classifies raw text/audio, not embeddings.")
    gold = _gold_ids(ds, model, where)
    columns = {}
    for modality in ("text", "audio"):
        key = f"{modality}_embeds"
        if getattr(config, f"has_{modality}", False):
            if key not in ds.column_names:
                raise CliError(f"{where}: the model uses {modality} but the feature dataset has no '{key}' column.")
            columns[modality] = ds[key]
    predictions, references = [], []
    groups = conversation_indices(ds)
    for start in tqdm(range(0, len(groups), args.batch_size), desc="merits evaluate", unit="batch", disable=args.quiet):
        chunk = groups[start : start + args.batch_size]
        num_turns = max(len(rows) for _, rows in chunk)
        turn_mask = torch.zeros(len(chunk), num_turns, dtype=torch.long)
        inputs = {"turn_mask": turn_mask}
        for modality, values in columns.items():
            size = getattr(config, f"{modality}_embed_dim")
            embeds = torch.zeros(len(chunk), num_turns, size)
            mask = torch.zeros(len(chunk), num_turns, dtype=torch.long)
            for b, (dialogue_id, rows) in enumerate(chunk):
                for t, row in enumerate(rows):
                    vector = values[row]
                    if vector is None or len(vector) == 0:
                        continue
                    if len(vector) != size:
                        raise CliError(
                            f"{where}, row {row} (dialogue {dialogue_id!r}): '{modality}_embeds' has {len(vector)} "
                            f"values, the model expects {size}."
                        )
                    try:
                        vector = check_finite(vector, f"'{modality}_embeds'", f"{where}, row {row} (dialogue {dialogue_id!r}, turn {t})")
                    except ValueError as error:
                        raise CliError(str(error)) from None
                    embeds[b, t] = torch.as_tensor(vector)
                    mask[b, t] = 1
            inputs[f"{modality}_embeds"], inputs[f"{modality}_mask"] = embeds, mask
        for b, (dialogue_id, rows) in enumerate(chunk):
            turn_mask[b, : len(rows)] = 1
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            try:
                logits = model(**inputs).logits.float()
            except ValueError as error:
                raise CliError(f"{where}: dialogues {[d for d, _ in chunk][:3]}...: {error}") from error
        for b, (_, rows) in enumerate(chunk):
            for t, row in enumerate(rows):
                predictions.append(int(logits[b, t].argmax()))
                references.append(gold[row])
    return predictions, references


def evaluate(args) -> int:
    from merits.data.schema import DataFormatError

    if args.drop_modality:  # the test-time modality-dropout analysis (merits/analysis.py)
        from merits.analysis import modality_dropout_report

        try:
            print(json.dumps(modality_dropout_report(args)))
        except (ValueError, DataFormatError, FileNotFoundError) as error:
            raise CliError(str(error)) from error
        return 0

    where = f"{args.dataset} file {args.file}"
    try:
        if args.dataset == "features":
            ds = _load_feature_dataset(args.file, args.split)
            predictions, references = _predict_features(args.model, ds, args, where)
        else:
            model, _ = load_model_and_processor(args.model, trust_remote_code=args.trust_remote_code)
            ds = _load_labelled_dataset(args.dataset, args.file, args.split, model)
            del model
            predictions, references = _predict_raw(args.model, ds, args, where)
    except DataFormatError as error:
        raise CliError(str(error)) from error
    labelled = [(p, r) for p, r in zip(predictions, references) if r >= 0]
    if not labelled:
        raise CliError(f"{where}: no labelled utterance to score.")
    model_config = _read_config(args.model)
    result = {
        "dataset": args.dataset,
        "file": str(args.file),
        "split": args.split,
        "model": str(args.model),
        "num_conversations": len(ds.unique("dialogue_id")),
        "num_utterances": len(labelled),
        **_score([p for p, _ in labelled], [r for _, r in labelled], model_config["id2label"]),
    }
    print(json.dumps(result))
    return 0


def _read_config(model_dir: str) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["id2label"] = {int(k): v for k, v in config["id2label"].items()}
    return config


def _score(predictions: list[int], references: list[int], id2label: dict) -> dict:
    """Metrics via the project's `evaluate` module merits/metrics (sklearn behind it)."""
    label_names = [str(id2label[i]) for i in range(len(id2label))]
    try:
        from merits.metrics import compute_erc_metrics

        metrics = compute_erc_metrics(predictions, references, label_names=label_names)
        backend = "merits.metrics (evaluate.load of merits/metrics/erc_metrics)"
    except ImportError:
        from sklearn.metrics import accuracy_score, f1_score

        metrics = {
            "weighted_f1": float(
                f1_score(references, predictions, labels=list(range(len(label_names))), average="weighted", zero_division=0)
            ),
            "accuracy": float(accuracy_score(references, predictions)),
        }
        for name, value in zip(
            label_names, f1_score(references, predictions, labels=list(range(len(label_names))), average=None, zero_division=0)
        ):
            metrics[f"f1_{name}"] = float(value)
        backend = "sklearn"
    per_class_f1 = {name: metrics.pop(f"f1_{name}") for name in label_names if f"f1_{name}" in metrics}
    gold_counts = Counter(references)
    predicted_counts = Counter(predictions)
    return {
        **metrics,
        "per_class_f1": per_class_f1,
        "counts": {name: int(gold_counts.get(i, 0)) for i, name in enumerate(label_names)},
        "predicted_counts": {name: int(predicted_counts.get(i, 0)) for i, name in enumerate(label_names)},
        "metrics_backend": backend,
    }


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from merits.helpformat import DefaultsHelpFormatter

    parser = argparse.ArgumentParser(prog="merits", description="MERITS-L / MiSTER-E emotion recognition in conversations.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="label every turn of the conversations of a JSONL file",
                            formatter_class=DefaultsHelpFormatter)
    p.add_argument("input", help="JSONL file: one conversation per line (a list of turns or {'turns': [...], ...})")
    p.add_argument("-o", "--output", required=True, help="output JSONL (appended to; rerunning resumes)")
    p.add_argument("--model", required=True, help="model folder (train.py's OUT/best/) or Hub folder")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per model call (default 8)")
    p.add_argument("--asr-model", default=None, help="transformers ASR checkpoint (e.g. Whisper) for turns without text")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--skip-errors", action="store_true",
                   help="record bad lines as {'error': ...} in the output and exit 0 (default: leave them out, "
                        "list them, exit 1)")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier output at -o instead of resuming it")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow Python code named by the model folder's tokenizer/feature-extractor config to run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=predict)

    e = commands.add_parser("evaluate", help="score a model on a labelled file; prints one JSON object",
                            formatter_class=DefaultsHelpFormatter)
    e.add_argument("--model", required=True, help="model folder (train.py's OUT/best/) or Hub folder")
    e.add_argument("--dataset", required=True, choices=DATASETS)
    e.add_argument(
        "--file", required=True,
        help="meld CSV, mosi label CSV, IEMOCAP root, EmoDB-like labels.csv, or a feature dataset folder",
    )
    e.add_argument("--split", default=None, help="score only this split (e.g. test); default: every row given")
    e.add_argument("--batch-size", type=int, default=8, help="conversations per model call (default 8)")
    e.add_argument("--asr-model", default=None, help="transformers ASR checkpoint for turns without text")
    e.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    e.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow Python code named by the model folder's tokenizer/feature-extractor config to run")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--drop-modality", choices=("speech", "text"), default=None,
                   help="MiSTER-E's modality-dropout analysis: also score with this modality removed at test time, with "
                        "the gate's mean weights (MERITS-L: its fallback); see merits/analysis.py")
    e.add_argument("--drop-probability", type=float, default=1.0,
                   help="with --drop-modality: remove it from each utterance with this probability (default 1: all)")
    e.add_argument("--drop-mode", choices=("mask", "zero"), default="mask",
                   help="with --drop-modality: mark the turns as lacking it (mask) or zero their embedding (zero)")
    e.add_argument("--seed", type=int, default=0, help="with --drop-probability < 1: the random draw's seed")
    e.set_defaults(func=evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from merits import register

    register()  # the Auto classes resolve merits folders in-process (no remote-code prompt)
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be >= 1")
    from merits.resume import ResumeMismatch

    try:
        return args.func(args)
    except (CliError, ResumeMismatch) as error:
        print(f"merits {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"merits {args.command}: stopped" + ("; finished lines are kept, rerun the same command to resume"
                                                     if args.command == "predict" else ""), file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"merits {args.command}: error: no space left on the device ({error.filename or error}); free some "
              "space and rerun the same command" + (" (finished lines are kept)" if args.command == "predict" else ""),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
