"""Leave-one-speaker-out model selection for the stage I speech head (corpora with no validation split, e.g. EmoDB).

Two inputs for the head:

* acoustic statistics (``audio_features: acoustic``, no speech backbone): the 225 MeritsAcousticFeatureExtractor
  statistics of each clip, standardised per fold on the training speakers;
* a frozen pretrained speech backbone (``audio_model_name_or_path``, e.g. ``openai/whisper-base``): every hidden
  state averaged over the clip's own frames, computed ONCE per utterance (``backbone_layer_features``, cached) and
  given to the head as a [K, H] layer stack. The head's learned layer weights mix them (the mix commutes with the time
  mean, so training on the stack is training the head on the backbone) after a per-layer standardisation with the
  training speakers' statistics (``standardize_speech_layers``, buffers of the model). ``best/`` is then the whole
  model, backbone included, that reads raw audio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.collate import FeatureCollator
from .arguments import TrainingArguments
from .loop import StagePlan, run_stage
from .stages import (
    Corpus,
    DataError,
    _where,
    add_acoustic_features,
    build_model,
    cached_utterance_features,
    final_results,
    heads_for,
    load_corpus,
    speech_feature_extractor,
    uses_acoustic_features,
    utterance_items,
)

def candidate_arguments(args: TrainingArguments, overrides: dict, where: str) -> TrainingArguments:
    """A copy of ``args`` with one ``fold_candidates`` entry applied (keys as in the YAML: ``utterance.learning_rate``)."""
    import copy

    from .arguments import _apply

    candidate = copy.deepcopy(args)
    for key, value in overrides.items():
        _apply(candidate, str(key), value, where, Path.cwd())
    return candidate.validate()


def _fold_record(model, plan: StagePlan, args: TrainingArguments, fold_dir: Path) -> dict:
    """Train one fold (or read its finished record): best epoch, validation and test predictions of the speech head."""
    import shutil

    record_file = fold_dir / "fold_predictions.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    results, predictions = run_stage(model, plan, args, fold_dir)
    if predictions is None:  # stage finished but its record was not written (killed in between): redo the fold
        shutil.rmtree(fold_dir / plan.tag, ignore_errors=True)
        results, predictions = run_stage(model, plan, args, fold_dir)
    record = {"best_epoch": results[f"{plan.tag}_audio_best_epoch"],
              "validation_weighted_f1": results[f"validation_{plan.tag}_audio_weighted_f1"]}
    for split in ("validation", "test"):
        preds, refs = predictions[split]["audio"]
        record[split] = {"predictions": preds.tolist(), "references": refs.tolist()}
    fold_dir.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps(record))
    return record


def backbone_layer_features(dataset, source: str, model, processor, cache_dir: Path, accelerator_state,
                            backbone_name: str, speed: float = 1.0) -> np.ndarray:
    """Every utterance's hidden states of the frozen speech backbone, each averaged over the utterance's own frames:
    [N, K, H] (``MeritsSpeechEncoder.pooled_layers``, one utterance at a time, so no padding reaches a clip), of the
    clips played at ``speed`` (``speed_perturb``; 1: as recorded).

    Computed once on the main process and cached in ``cache_dir`` under the dataset's fingerprint, the backbone's
    name and the speed; the other processes read the cache."""
    from ..data.audio import speed_perturb

    key = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_name)[-80:]
    speed_tag = "" if speed == 1 else f"_speed{speed:g}"
    cache_file = Path(cache_dir) / f"backbone_layers_{key}_{dataset._fingerprint}{speed_tag}.npy"

    def pooled_layers(array, where):
        array = speed_perturb(array, speed)
        batch = processor(conversations=[[{"text": None, "audio": array}]], sampling_rate=16000, return_tensors="pt")
        with torch.inference_mode():
            pooled = model.speech_encoder.pooled_layers(input_values=batch.get("input_values"),
                                                        input_features=batch.get("input_features"),
                                                        audio_attention_mask=batch.get("audio_attention_mask"))
        value = pooled[:, 0].float().numpy()
        if not np.isfinite(value).all():
            raise DataError(f"{where}: the speech backbone gave NaN/inf hidden states")
        return value

    return cached_utterance_features(dataset, cache_file, accelerator_state, pooled_layers, source, "all",
                                     "speech backbone (frozen) [every utterance]"
                                     + ("" if speed == 1 else f" at speed {speed:g}"))


def _head_arguments(args: TrainingArguments, layers: int) -> TrainingArguments:
    """``args`` for the speech head alone on precomputed [K, H] layer stacks (the backbone route's folds)."""
    import copy

    head = copy.deepcopy(args)
    head.audio_model_name_or_path, head.audio_config = None, None
    head.model = dict(head.model, audio_feature_layers=layers)
    return head


def run_speaker_folds(args: TrainingArguments, output_dir: Path, state) -> dict:
    """Stage I speech head with leave-one-speaker-out model selection; ``best/`` is then trained on every speaker.

    With S speakers in sorted order, fold i tests speaker S[i], validates on S[i+1] (cyclic) and trains on the
    others. Each candidate of ``fold_candidates`` is trained on every fold; per fold, the candidate and epoch
    with the best wF1 on the *validation* speaker are kept and scored once on the *test* speaker, so a held-out
    speaker never chooses its own model. Pooled over the folds this gives ``test_stage1_audio_*`` (the LOSO
    figures; also written as ``loso_*``); the same pooling over the validation speakers gives
    ``validation_stage1_audio_*``. The final model takes the candidate with the best pooled validation wF1,
    trained on all speakers for the median of its folds' best epochs (inputs standardised on all speakers), and is
    written to ``OUT/best/``. With ``fold_refit``, each fold's test predictions come instead from its chosen candidate
    retrained on the training + validation speakers for the median of that candidate's best epochs. The head reads acoustic statistics or a frozen backbone's pooled layers (module doc).
    """
    import datasets
    from accelerate.utils import set_seed

    from ..metrics import compute_erc_metrics
    from ..processing_merits import MeritsProcessor
    from . import report
    from .model_card import write_best_model

    architecture = args.architecture
    corpus = load_corpus(args, require_validation=False)
    source = args.data_dir or corpus.name
    acoustic = uses_acoustic_features(args)
    if not corpus.has_audio:
        raise DataError(f"{source}: speaker_folds trains the speech head; the corpus has no audio")
    full = datasets.concatenate_datasets(list(corpus.splits.values()))
    if args.speaker_column not in full.column_names:
        raise DataError(f"{source}: no {args.speaker_column!r} column for speaker folds (columns: {full.column_names})")
    speakers = np.asarray([str(s).strip() if s is not None else "" for s in full[args.speaker_column]])
    if (speakers == "").any():
        row = int(np.flatnonzero(speakers == "")[0])
        raise DataError(f"{_where(source, 'all', full[row]['dialogue_id'], full[row]['turn'])}: no {args.speaker_column!r}")
    distinct = sorted(set(speakers.tolist()))
    if len(distinct) < 3:
        raise DataError(f"{source}: speaker folds need at least 3 speakers (test, validation, train), found {distinct}")

    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    label_names = corpus.label_names
    perturbed = []  # the layers of speed-perturbed clips (frozen backbone only), added to the training rows of every fit
    if acoustic:
        everything = Corpus(splits={"train": full}, label_names=corpus.label_names, name=corpus.name, has_audio=True)
        extractor = add_acoustic_features(everything, cache_dir, state)  # normalised on every speaker: the final model's
        full = everything.splits["train"]
        if any(row is None for row in full["audio_features"]):
            raise DataError(f"{source}: every utterance needs audio for speaker folds")
        mean, std = np.asarray(extractor.feature_mean, np.float32), np.asarray(extractor.feature_std, np.float32)
        raw = np.asarray(full["audio_features"], dtype=np.float32) * std + mean
        plain = full.remove_columns("audio_features")
        feature_kwargs = dict(audio_feature_dim=extractor.feature_size)
    else:
        set_seed(args.seed)
        backbone_model = build_model(args, architecture, label_names, use_text=False, use_audio=True)
        extractor = speech_feature_extractor(args, backbone_model.config.audio_config)
        processor = MeritsProcessor(tokenizer=None, feature_extractor=extractor,
                                    label2id=dict(backbone_model.config.label2id), max_length=args.max_text_length)
        backbone_name = args.audio_model_name_or_path or "audio_config"
        raw = backbone_layer_features(full, source, backbone_model, processor, cache_dir, state, backbone_name)
        perturbed = [backbone_layer_features(full, source, backbone_model, processor, cache_dir, state, backbone_name,
                                             speed=float(speed))
                     for speed in args.audio_speed_perturbation or []]
        plain = full.remove_columns([c for c in ("audio_features",) if c in full.column_names])
        feature_kwargs = dict(audio_feature_dim=raw.shape[2])
    standardize_in_model = not acoustic

    def fold_inputs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """(mean, std) of the training rows and the feature column the head reads."""
        fold_mean, fold_std = raw[rows].mean(axis=0), np.maximum(raw[rows].std(axis=0), 1e-3)
        return fold_mean, fold_std, (raw if standardize_in_model else (raw - fold_mean) / fold_std).tolist()

    def head_model(cargs: TrainingArguments, fold_mean, fold_std):
        if acoustic:
            return build_model(cargs, architecture, label_names, use_text=False, use_audio=True, **feature_kwargs)
        model = build_model(_head_arguments(cargs, raw.shape[1]), architecture, label_names, use_text=False,
                            use_audio=True, **feature_kwargs)
        if standardize_in_model:
            model.speech_encoder.set_layer_statistics(fold_mean, fold_std)
        return model

    columns = ["dialogue_id", "turn", "label", "audio_features"]
    heads = heads_for("utterance", architecture, False, True)

    # built once: every fit selects its training rows from them (raw layers: the model standardises with its fit's statistics)
    perturbed_sets = [plain.add_column("audio_features", copy.tolist()) for copy in perturbed]

    def perturbed_items(rows: np.ndarray) -> list:
        """The speed-perturbed copies of ``rows``."""
        return [item for dataset in perturbed_sets for item in utterance_items(dataset.select(np.flatnonzero(rows)), columns)]

    def train_fold(cargs, train_rows, validation_rows, test_rows, fold_dir: Path, refit: bool = False) -> dict:
        fold_mean, fold_std, column = fold_inputs(train_rows)
        fold = plain.add_column("audio_features", column)
        items = {name: utterance_items(fold.select(np.flatnonzero(rows)), columns)
                 for name, rows in (("train", train_rows), ("validation", validation_rows), ("test", test_rows))}
        items["train"] += perturbed_items(train_rows)
        set_seed(cargs.seed)
        model = head_model(cargs, fold_mean, fold_std)
        plan = StagePlan("utterance", "stage1", heads, items["train"], items["validation"], items["test"],
                         FeatureCollator(), cargs.utterance, label_names, keep_last_epoch=refit)
        return _fold_record(model, plan, cargs, fold_dir)

    candidates = list(args.fold_candidates or [{}])
    records: list[list[dict]] = []  # [candidate][fold]
    for c, overrides in enumerate(candidates):
        cargs = candidate_arguments(args, overrides, f"fold_candidates[{c}]")
        records.append([])
        for i, held_out in enumerate(distinct):
            validation_speaker = distinct[(i + 1) % len(distinct)]
            test_rows = speakers == held_out
            validation_rows = speakers == validation_speaker
            train_rows = ~(test_rows | validation_rows)
            fold_dir = output_dir / "folds" / f"candidate{c}" / f"speaker_{held_out}"
            record = train_fold(cargs, train_rows, validation_rows, test_rows, fold_dir)
            record.update(test_speaker=held_out, validation_speaker=validation_speaker)
            records[c].append(record)

    def pooled(pairs: list[dict]) -> tuple[list, list]:
        return [p for r in pairs for p in r["predictions"]], [t for r in pairs for t in r["references"]]

    results: dict[str, Any] = {"speaker_folds": len(distinct), "fold_candidates": len(candidates)}
    for c, folds in enumerate(records):
        for split in ("validation", "test"):
            metrics = compute_erc_metrics(*pooled([r[split] for r in folds]), label_names=label_names)
            for metric in ("weighted_f1", "unweighted_average_recall", "accuracy"):
                results[f"candidate{c}_{split}_stage1_audio_{metric}"] = metrics[metric]
    chosen_per_fold = [max(range(len(candidates)), key=lambda c: (records[c][i]["validation_weighted_f1"], -c))
                       for i in range(len(distinct))]
    test_records = [records[c][i] for i, c in enumerate(chosen_per_fold)]
    if args.fold_refit:
        # each fold's choice (candidate, epochs) retrained on its training + validation speakers, then tested once
        test_records = []
        for i, c in enumerate(chosen_per_fold):
            refit_args = candidate_arguments(args, candidates[c], f"fold_candidates[{c}]")
            # the median over the candidate's folds of their best epochs (one validation speaker's choice is noisy)
            refit_args.utterance.num_epochs = max(1, int(round(float(np.median([r["best_epoch"] for r in records[c]])))))
            test_rows = speakers == distinct[i]
            fold_dir = output_dir / "folds" / f"candidate{c}" / f"speaker_{distinct[i]}" / "refit"
            # no speaker is left for validation: the training rows stand in (as for the final model below)
            test_records.append(train_fold(refit_args, ~test_rows, ~test_rows, test_rows, fold_dir, refit=True))
    predictions = {}
    for split in ("validation", "test"):
        chosen = [records[c][i] for i, c in enumerate(chosen_per_fold)] if split == "validation" else test_records
        preds, refs = pooled([r[split] for r in chosen])
        predictions[(split, "stage1", "audio")] = (torch.tensor(preds), torch.tensor(refs))
        for metric, value in compute_erc_metrics(preds, refs, label_names=label_names).items():
            results[f"{split}_stage1_audio_{metric}"] = value
            if split == "test":
                results[f"loso_stage1_audio_{metric}"] = value
    results["fold_chosen_candidates"] = ",".join(str(c) for c in chosen_per_fold)

    # the final model: the best candidate on the pooled validation speakers, trained on every speaker
    final = max(range(len(candidates)), key=lambda c: (results[f"candidate{c}_validation_stage1_audio_weighted_f1"], -c))
    final_args = candidate_arguments(args, candidates[final], f"fold_candidates[{final}]")
    final_args.utterance.num_epochs = max(1, int(round(float(np.median([r["best_epoch"] for r in records[final]])))))
    every_row = np.ones(len(speakers), dtype=bool)
    all_mean, all_std, column = fold_inputs(every_row)
    everything_items = utterance_items(plain.add_column("audio_features", column) if not acoustic else full, columns)
    training_items = everything_items + perturbed_items(every_row)
    set_seed(final_args.seed)
    model = head_model(final_args, all_mean, all_std)
    # no speaker is left for validation: the training data stands in for the scores, and the last epoch is kept
    plan = StagePlan("utterance", "stage1", heads, training_items, everything_items, None, FeatureCollator(),
                     final_args.utterance, label_names, keep_last_epoch=True)
    fit, _ = run_stage(model, plan, final_args, output_dir / "final")
    if not acoustic:  # the trained head (layer weights, standardisation, head, classifier) onto the backbone
        if final_args.model != args.model:  # the selected candidate's head differs from the base config's (sizes, activation)
            set_seed(final_args.seed)
            backbone_model = build_model(final_args, architecture, label_names, use_text=False, use_audio=True)
        missing, unexpected = backbone_model.load_state_dict(model.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("speech_encoder.backbone.")]
        if missing or unexpected:
            raise RuntimeError(f"the trained speech head does not fit the backbone model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        model = backbone_model
    results.update(selected_candidate=final, final_epochs=final_args.utterance.num_epochs,
                   final_fit_train_weighted_f1=fit["validation_stage1_audio_weighted_f1"])
    results.update({k: v for k, v in final_results(results, "stage1").items() if k not in results})

    if state.is_main_process:
        model.config.stage = "utterance"
        processor = MeritsProcessor(tokenizer=None, feature_extractor=extractor, label2id=dict(model.config.label2id),
                                    max_length=args.max_text_length)
        report.write_outputs(output_dir, results, predictions, label_names)
        write_best_model(model, processor, output_dir / "best", results, corpus.name, final_args)
        (output_dir / "fold_records.json").write_text(json.dumps(
            [[{k: v for k, v in r.items() if k not in ("validation", "test")} for r in folds] for folds in records], indent=1))
        table = report.results_table({architecture: results})
        (output_dir / "results.md").write_text(table + "\n")
        print(table)
        print(f"leave-one-speaker-out over {len(distinct)} speakers: test wF1 {results['test_stage1_audio_weighted_f1']:.4f}, "
              f"UAR {results['test_stage1_audio_unweighted_average_recall']:.4f}; best/ = candidate {final}, "
              f"{final_args.utterance.num_epochs} epochs on every speaker")
        print(report.run_summary(output_dir, {architecture: results}, architecture, logs=args.report_to == "tensorboard"),
              flush=True)
    state.wait_for_everyone()
    return results
