"""Real pretrained encoders (scripts/offline_models.py) against the classic baselines, on dev / held-out speakers.

Tasks (``--tasks emodb,mosi,meld``):

- ``emodb``: the frozen Whisper-base encoder run on each clip's own mel frames
  (``merits.whisper_encoder_merits``), every hidden state mean-pooled over the clip's frames. Leave-one-speaker-out
  over EmoDB's speakers: fold i tests speaker i, validates on the next speaker (cyclic), trains on the rest.
  (a) the probe: the 7 pooled layers concatenated, standardised, + logistic regression (C chosen on the
  validation speaker); (b) ours: MERITS-L's speech head with learned softmax layer weights over the same 7
  pooled layers (``audio_feature_layers``; the mix commutes with the time mean, so this is the head on the frozen
  backbone), epoch chosen on the validation speaker. Also: own frames vs the 30 s-padded encoder on
  ``--padded_clips`` clips (max abs / relative difference of the pooled vectors, CPU-time ratio).
  ``--probe_speeds 0.9,1.1``: the probe again, its training (and refit) clips added at those speeds
  (``merits.data.audio.speed_perturb``, what ``audio_speed_perturbation`` does in train.py's speaker folds);
  validation and test clips as recorded. ``--probe_std``: the probe on statistics pooling (every layer's mean and
  standard deviation over the clip's frames, 7 x 1,024).
- ``mosi`` / ``meld``: the frozen all-MiniLM-L6-v2 mean-pooled embeddings (raw, and L2-normalised as sentence-transformers
  returns them) + logistic regression, C chosen on dev
  (dev weighted F1; the test splits are not touched).
  ``--context_windows 1,2,4,all``: the same probe on [own embedding, mean of the k previous and k next utterances of
  the same conversation] (L2-normalised): whether a conversation's neighbouring utterances carry anything a linear
  reader can use beyond the utterance itself (what stage II's context encoder has to find).
  ``--write_features DIR``: also writes those frozen embeddings as feature datasets (api.md section 5) for
  ``train.py --train_features``: ``DIR/{task}_frozen_minilm_{train,validation}.parquet`` with the conversations, and
  ``..._alone.parquet`` with every utterance a conversation of its own (stage II without any context: the ablation
  that tells what the context encoder adds over a trained head on the same embeddings).

``--runs NAME=DIR[,NAME=DIR...]`` records train.py runs made with the real-model configs (each DIR's
``all_results.json``: the validation / leave-one-speaker-out figures, under ``NAME/``), e.g.
``--runs emodb_whisper=OUT`` for ``configs/emodb_whisper_cpu.yaml``; ``--tasks ''`` records only those.

Needs ``python scripts/offline_models.py`` (the models) and ``MERITS_SHARED_DATA`` (default ../shared/data).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import record  # noqa: E402

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def shared_data() -> Path:
    return Path(os.environ.get("MERITS_SHARED_DATA", REPO.parent / "shared" / "data"))


def scores(gold, pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    return {"weighted_f1": float(f1_score(gold, pred, average="weighted")),
            "uar": float(recall_score(gold, pred, average="macro")), "accuracy": float(accuracy_score(gold, pred))}


def logreg(C: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))


# ------------------------------------------------------------------------------------------------------- EmoDB


def whisper_pooled(encoder, feature_extractor, waves, own: bool = True, std: bool = False) -> tuple[np.ndarray, float]:
    """[N, layers, d] per-layer means over each clip's frames (``std``: [N, layers, 2d], means then standard
    deviations), and the CPU seconds it took."""
    from merits.whisper_encoder_merits import whisper_encoder_own_frames

    out = []
    start = time.process_time()
    with torch.no_grad():
        for wave in waves:
            if own:
                feats = feature_extractor(wave, sampling_rate=16000, padding="longest", return_attention_mask=True,
                                          return_tensors="pt")
                states, mask = whisper_encoder_own_frames(encoder, feats.input_features, feats.attention_mask)
            else:  # the 30 s window transformers' encoder insists on, pooled over the clip's frames only
                feats = feature_extractor(wave, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
                states = encoder(feats.input_features, output_hidden_states=True).hidden_states
                frames = states[0].shape[1]
                mask = feats.attention_mask[:, ::2][:, :frames].bool()
            weights = mask[0].float()[:, None]
            means = torch.stack([(s[0] * weights).sum(0) / weights.sum() for s in states])
            if std:
                spread = torch.stack([s[0][mask[0]].std(0) for s in states])
                means = torch.cat([means, spread], -1)
            out.append(means.numpy())
    return np.stack(out), time.process_time() - start


def emodb_data():
    from merits.data.audio import load_audio

    data = shared_data() / "emodb"
    rows = list(csv.DictReader(open(data / "labels.csv")))
    waves = [load_audio(str(data / r["file"]), 16000) for r in rows]
    return waves, np.array([r["emotion"] for r in rows]), np.array([r["speaker"] for r in rows])


def folds(speakers):
    distinct = sorted(set(speakers.tolist()))
    for i, test in enumerate(distinct):
        validation = distinct[(i + 1) % len(distinct)]
        yield test, validation, speakers == test, speakers == validation


def loso_probe(x, labels, speakers, extra_views=()):
    """The probe's LOSO figures; ``extra_views`` ([N, D] each, e.g. speed-perturbed clips) join every fit's
    training rows, never its validation or test rows."""
    def fit(C, rows):
        views = [x[rows]] + [view[rows] for view in extra_views]
        return logreg(C).fit(np.concatenate(views), np.concatenate([labels[rows]] * len(views)))

    preds, gold, chosen = [], [], []
    for _, _, test, validation in folds(speakers):
        train = ~(test | validation)
        best = max(C_GRID, key=lambda C: scores(labels[validation], fit(C, train).predict(x[validation]))["weighted_f1"])
        chosen.append(best)
        preds += fit(best, train | validation).predict(x[test]).tolist()
        gold += labels[test].tolist()
    return scores(gold, preds), chosen


def loso_head(layers, labels, speakers, epochs=60, seed=42, hidden=(256,), weight_decay=0.01, lr=1e-3):
    """MERITS-L's speech head with learned softmax layer weights on the pooled layers; epoch picked on the
    validation speaker, then scored once on the test speaker."""
    from merits import MeritsConfig
    from merits.modeling_merits import MeritsSpeechEncoder

    names = sorted(set(labels.tolist()))
    y = np.array([names.index(v) for v in labels])
    preds, gold, val_preds, val_gold, best_epochs = [], [], [], [], []
    for _, _, test, validation in folds(speakers):
        train = ~(test | validation)
        mean = layers[train].mean(0, keepdims=True)
        std = layers[train].std(0, keepdims=True) + 1e-3
        x = torch.tensor((layers - mean) / std, dtype=torch.float32)
        torch.manual_seed(seed)
        config = MeritsConfig(architecture="merits-l", audio_feature_dim=layers.shape[2],
                              audio_feature_layers=layers.shape[1], id2label=dict(enumerate(names)),
                              speech_head_hidden_sizes=list(hidden), speech_head_activation="relu",
                              speech_head_dropout=0.3, speech_head_input_dropout=0.2)
        head = MeritsSpeechEncoder(config)
        optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        index = np.flatnonzero(train)
        generator = np.random.default_rng(seed)
        best = (-1.0, 0, None, None)
        for epoch in range(1, epochs + 1):
            head.train()
            for batch in np.array_split(generator.permutation(index), max(1, len(index) // 32)):
                _, logits = head(audio_features=x[batch])
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y[batch]))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            head.eval()
            with torch.no_grad():
                v = head(audio_features=x[validation])[1].argmax(-1).numpy()
                t = head(audio_features=x[test])[1].argmax(-1).numpy()
            f1 = scores(y[validation], v)["weighted_f1"]
            if f1 > best[0]:
                best = (f1, epoch, v, t)
        best_epochs.append(best[1])
        val_preds += best[2].tolist(); val_gold += y[validation].tolist()
        preds += best[3].tolist(); gold += y[test].tolist()
    return scores(gold, preds), scores(val_gold, val_preds), best_epochs


def task_emodb(args) -> dict:
    from transformers import WhisperFeatureExtractor, WhisperModel

    figures = {}
    torch.set_num_threads(args.threads)
    encoder = WhisperModel.from_pretrained("openai/whisper-base").get_encoder().eval()
    extractor = WhisperFeatureExtractor.from_pretrained("openai/whisper-base")
    waves, labels, speakers = emodb_data()
    def pooled(tag: str, own: bool, speed: float = 1.0, std: bool = False) -> np.ndarray:
        """Every clip's pooled layers, cached in --cache (the CPU seconds, or "cached", go into the figures)."""
        from merits.data.audio import speed_perturb

        cache = Path(args.cache) / f"emodb_whisper_base_{tag}.npy"
        if cache.is_file():
            figures[f"emodb/{tag}_cpu_seconds"] = "cached"
            return np.load(cache)
        vectors, seconds = whisper_pooled(encoder, extractor, [speed_perturb(w, speed) for w in waves], own=own, std=std)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, vectors)
        figures[f"emodb/{tag}_cpu_seconds"] = round(seconds, 1)
        return vectors

    layers = pooled("own_frames", own=True)
    figures["emodb/clips"] = len(waves)
    figures["emodb/speakers"] = len(set(speakers.tolist()))
    figures["emodb/mean_clip_seconds"] = round(float(np.mean([len(w) for w in waves])) / 16000, 2)
    probe, chosen = loso_probe(layers.reshape(len(layers), -1), labels, speakers)
    figures.update({f"emodb/probe_own_frames/{k}": round(v, 4) for k, v in probe.items()})
    figures["emodb/probe_own_frames/C_per_fold"] = chosen
    if args.probe_speeds:
        speeds = [float(v) for v in args.probe_speeds.split(",")]
        views = [pooled(f"own_frames_speed{v:g}", own=True, speed=v) for v in speeds]
        probe_sp, chosen_sp = loso_probe(layers.reshape(len(layers), -1), labels, speakers,
                                         [view.reshape(len(view), -1) for view in views])
        figures.update({f"emodb/probe_own_frames_speed_perturbed/{k}": round(v, 4) for k, v in probe_sp.items()})
        figures["emodb/probe_own_frames_speed_perturbed/C_per_fold"] = chosen_sp
        figures["emodb/probe_own_frames_speed_perturbed/speeds"] = speeds
    if args.probe_std:  # statistics pooling: every layer's mean AND standard deviation over the clip's frames
        stats = pooled("own_frames_mean_std", own=True, std=True)
        probe_std, chosen_std = loso_probe(stats.reshape(len(stats), -1), labels, speakers)
        figures.update({f"emodb/probe_own_frames_mean_std/{k}": round(v, 4) for k, v in probe_std.items()})
        figures["emodb/probe_own_frames_mean_std/C_per_fold"] = chosen_std
    test, validation, epochs = loso_head(layers, labels, speakers)
    figures.update({f"emodb/ours_layer_weights_head/{k}": round(v, 4) for k, v in test.items()})
    figures.update({f"emodb/ours_layer_weights_head/validation_{k}": round(v, 4) for k, v in validation.items()})
    figures["emodb/ours_layer_weights_head/best_epochs"] = epochs
    figures["emodb/ours_minus_probe_weighted_f1"] = round(test["weighted_f1"] - probe["weighted_f1"], 4)

    if args.padded_probe:  # the same probe and head on the 30 s-padded encoder's vectors of every clip
        padded_layers = pooled("padded", own=False)
        probe_padded, chosen_padded = loso_probe(padded_layers.reshape(len(padded_layers), -1), labels, speakers)
        figures.update({f"emodb/probe_padded/{k}": round(v, 4) for k, v in probe_padded.items()})
        figures["emodb/probe_padded/C_per_fold"] = chosen_padded
        test_padded, _, _ = loso_head(padded_layers, labels, speakers)
        figures.update({f"emodb/ours_layer_weights_head_padded/{k}": round(v, 4) for k, v in test_padded.items()})

    if args.padded_clips:
        subset = np.random.default_rng(0).choice(len(waves), size=min(args.padded_clips, len(waves)), replace=False)
        own, own_seconds = whisper_pooled(encoder, extractor, [waves[i] for i in subset], own=True)
        padded, padded_seconds = whisper_pooled(encoder, extractor, [waves[i] for i in subset], own=False)
        difference = np.abs(own - padded)
        figures["emodb/own_vs_padded/clips"] = len(subset)
        figures["emodb/own_vs_padded/max_abs_difference"] = float(difference.max())
        figures["emodb/own_vs_padded/max_relative_difference"] = float((difference.max(-1) / np.abs(padded).max(-1)).max())
        figures["emodb/own_vs_padded/mean_cosine"] = float(np.mean(
            (own * padded).sum(-1) / (np.linalg.norm(own, axis=-1) * np.linalg.norm(padded, axis=-1))))
        figures["emodb/own_vs_padded/cpu_seconds_own"] = round(own_seconds, 2)
        figures["emodb/own_vs_padded/cpu_seconds_padded"] = round(padded_seconds, 2)
        figures["emodb/own_vs_padded/speedup"] = round(padded_seconds / own_seconds, 2)
    return figures


# ------------------------------------------------------------------------------------------------------- text


def minilm_embeddings(texts, batch_size=64):
    from transformers import AutoModel, AutoTokenizer

    name = "sentence-transformers/all-MiniLM-L6-v2"
    tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    order = np.argsort([len(t) for t in texts])
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out[rows] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return out


def task_text(name: str, args) -> dict:
    from merits import data as loaders

    torch.set_num_threads(args.threads)
    folder = shared_data() / name
    dsd = loaders.load_meld(folder, label="emotion", with_audio=False) if name == "meld" else \
        loaders.load_mosi(folder, with_audio=False)
    train, dev = dsd["train"], dsd["validation"]
    start = time.process_time()
    x_train, x_dev = minilm_embeddings(train["text"]), minilm_embeddings(dev["text"])
    seconds = time.process_time() - start
    y_train, y_dev = np.array(train["label"]), np.array(dev["label"])
    figures = {f"{name}/embedding_cpu_seconds": round(seconds, 1), f"{name}/train_utterances": len(train),
               f"{name}/dev_utterances": len(dev)}

    def dev_probe(tag: str, a: np.ndarray, b: np.ndarray) -> None:
        """LR on ``a`` (train rows), C chosen on ``b`` (dev rows): dev weighted F1 / accuracy and C under ``tag``."""
        results = {C: scores(y_dev, logreg(C).fit(a, y_train).predict(b)) for C in C_GRID}
        best = max(C_GRID, key=lambda C: results[C]["weighted_f1"])
        figures.update({f"{name}/{tag}/dev_weighted_f1": round(results[best]["weighted_f1"], 4),
                        f"{name}/{tag}/dev_accuracy": round(results[best]["accuracy"], 4), f"{name}/{tag}/C": best})

    # mean pooling as the model was trained; sentence-transformers' pipeline then L2-normalises (its Normalize module)
    unit = {"train": x_train / np.linalg.norm(x_train, axis=1, keepdims=True),
            "dev": x_dev / np.linalg.norm(x_dev, axis=1, keepdims=True)}
    dev_probe("frozen_minilm_logreg", x_train, x_dev)
    dev_probe("frozen_minilm_l2_logreg", unit["train"], unit["dev"])
    if args.write_features:
        write_feature_datasets(Path(args.write_features), name, {"train": (train, x_train), "validation": (dev, x_dev)})
    places = {"train": (np.array(train["dialogue_id"]), np.array(train["turn"])),
              "dev": (np.array(dev["dialogue_id"]), np.array(dev["turn"]))}
    for window in filter(None, args.context_windows.split(",")):
        k = None if window == "all" else int(window)
        a, b = (np.hstack([unit[s], neighbour_mean(unit[s], *places[s], k)]) for s in ("train", "dev"))
        dev_probe(f"frozen_minilm_l2_context{window}_logreg", a, b)
    return figures


def write_feature_datasets(folder: Path, name: str, splits: dict) -> None:
    """Each split's embeddings as a feature dataset (dialogue_id, turn, label, text_embeds), with its conversations
    and with every utterance alone (``_alone``: dialogue_id ``<dialogue>#<turn>``, turn 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (dataset, x) in splits.items():
        features = dataset.select_columns(["dialogue_id", "turn", "label"]).add_column("text_embeds", x.tolist())
        features.to_parquet(str(folder / f"{name}_frozen_minilm_{split}.parquet"))
        alone = features.map(lambda row: {"dialogue_id": f"{row['dialogue_id']}#{row['turn']}", "turn": 0})
        alone.to_parquet(str(folder / f"{name}_frozen_minilm_{split}_alone.parquet"))


def neighbour_mean(x: np.ndarray, conversations: np.ndarray, turns: np.ndarray, window: int | None) -> np.ndarray:
    """[N, d]: the mean of the ``window`` previous and next utterances' rows of the same conversation (None: all
    of them), the row itself excluded; zeros where a conversation has one utterance."""
    out = np.zeros_like(x)
    for conversation in np.unique(conversations):
        rows = np.where(conversations == conversation)[0]
        for i in rows:
            near = rows[(rows != i) & ((window is None) | (np.abs(turns[rows] - turns[i]) <= (window or 0)))]
            if len(near):
                out[i] = x[near].mean(0)
    return out


#: all_results.json keys recorded for a train.py run (validation figures, the leave-one-speaker-out ones, selections)
RUN_KEYS = ("validation_", "loso_", "test_stage1_audio_", "final_epochs", "selected_", "stage1_text_best_epoch")


def task_runs(specs: str) -> dict:
    figures = {}
    for spec in filter(None, specs.split(",")):
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--runs expects NAME=DIR, got {spec!r}")
        results_file = Path(folder) / "all_results.json"
        if not results_file.is_file():
            raise SystemExit(f"--runs {spec}: {results_file} does not exist (is the run finished?)")
        results = json.loads(results_file.read_text())
        for key, value in sorted(results.items()):
            if key.startswith(RUN_KEYS) and isinstance(value, (int, float, str)) and not key.endswith("_confusion_matrix"):
                figures[f"{name}/{key}"] = round(value, 4) if isinstance(value, float) else value
        figures[f"{name}/run_dir"] = str(folder)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="emodb,mosi,meld")
    parser.add_argument("--padded_clips", type=int, default=40, help="clips for the own-frames vs 30 s comparison")
    parser.add_argument("--padded_probe", action="store_true",
                        help="also the probe and the head on 30 s-padded vectors of EVERY clip (~10x the encoder time)")
    parser.add_argument("--probe_speeds", default="", help="e.g. 0.9,1.1: also the probe with speed-perturbed training clips")
    parser.add_argument("--context_windows", default="",
                        help="e.g. 1,2,4,all: also the text probe with the mean of that many neighbouring utterances")
    parser.add_argument("--write_features", default="",
                        help="DIR: also write the frozen text embeddings as train.py feature datasets (module doc)")
    parser.add_argument("--probe_std", action="store_true",
                        help="also the probe on every layer's mean and standard deviation (statistics pooling)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "merits-offline" / "bench"))
    parser.add_argument("--runs", default="", help="NAME=DIR[,NAME=DIR...]: train.py runs to record (module doc)")
    parser.add_argument("--name", default=None, help="record name (default real_models_<tasks>)")
    parser.add_argument("--load_note", default="", help="how loaded the machine was (recorded in the notes)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    figures = {}
    for task in filter(None, args.tasks.split(",")):
        figures.update(task_emodb(args) if task == "emodb" else task_text(task, args))
    figures.update(task_runs(args.runs))
    load = os.getloadavg()
    notes = (f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} cores; "
             f"{args.load_note}").strip("; ")
    record(args.name or "real_models_" + (args.tasks.replace(",", "_") or "runs"), figures, notes)


if __name__ == "__main__":
    main()
