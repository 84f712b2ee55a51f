"""Classical baselines the benchmarks compare our stages against.

- :func:`tfidf_logreg`: TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression for the
  text-only sets (MELD emotion, MOSI binary sentiment). Fit on train; ``C`` is either fixed or picked
  on the dev set from a small grid (the returned dict says which, so the figure is honest about it).
- :func:`mfcc_statistics`: utterance-level MFCC statistics computed with numpy only (log-mel
  filterbank -> DCT -> mean/std/min/max of 20 MFCCs and their deltas + log-energy stats).
- :func:`speaker_independent_svm`: a linear SVM on standardised features with leave-one-speaker-out
  folds, returning pooled weighted F1 and UAR (unweighted average recall) over all folds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.pipeline import FeatureUnion, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _scores(gold: Sequence, pred: Sequence) -> dict[str, float]:
    return {
        "weighted_f1": float(f1_score(gold, pred, average="weighted")),
        "accuracy": float(accuracy_score(gold, pred)),
        "uar": float(recall_score(gold, pred, average="macro")),
    }


def _tfidf_features():
    return FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, lowercase=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True, lowercase=True)),
        ]
    )


def tfidf_logreg(
    train_texts: Sequence[str],
    train_labels: Sequence,
    dev_texts: Sequence[str],
    dev_labels: Sequence,
    C: float | None = None,
    seed: int = 0,
) -> dict[str, float | str]:
    """TF-IDF + logistic regression fit on train, scored on dev.

    ``C=None`` tunes C on dev over :data:`C_GRID` (an optimistic baseline: it sees the dev labels);
    a number fixes it. Returns dev ``weighted_f1``, ``accuracy``, ``uar``, the ``C`` used and how it was chosen.
    """
    if len(train_texts) != len(train_labels) or len(dev_texts) != len(dev_labels):
        raise ValueError("tfidf_logreg: texts and labels differ in length")
    vectorizer = _tfidf_features()
    train_x = vectorizer.fit_transform([str(t) for t in train_texts])
    dev_x = vectorizer.transform([str(t) for t in dev_texts])
    best: dict | None = None
    for value in C_GRID if C is None else (C,):
        model = LogisticRegression(C=value, max_iter=2000, random_state=seed).fit(train_x, list(train_labels))
        scores = _scores(list(dev_labels), model.predict(dev_x))
        if best is None or scores["weighted_f1"] > best["weighted_f1"]:
            best = {**scores, "C": value}
    best["C_selection"] = "tuned on dev" if C is None else "fixed"
    return best


# ---------------------------------------------------------------------------------------------- audio


def _mel_filterbank(sampling_rate: int, n_fft: int, n_mels: int, fmin: float = 20.0, fmax: float | None = None) -> np.ndarray:
    fmax = fmax or sampling_rate / 2
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    mel_points = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    bins = np.floor((n_fft + 1) * mel_to_hz(mel_points) / sampling_rate).astype(int)
    bank = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(1, n_mels + 1):
        left, centre, right = bins[m - 1], bins[m], bins[m + 1]
        for k in range(left, centre):
            bank[m - 1, k] = (k - left) / max(centre - left, 1)
        for k in range(centre, right):
            bank[m - 1, k] = (right - k) / max(right - centre, 1)
    return bank


def mfcc_statistics(waveform: np.ndarray, sampling_rate: int = 16000, n_mfcc: int = 20, n_mels: int = 40) -> np.ndarray:
    """Utterance-level MFCC statistics (numpy only): a fixed-length vector of 6*n_mfcc + 4 values."""
    x = np.asarray(waveform, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"mfcc_statistics: expected a non-empty mono waveform, got shape {x.shape}")
    frame, hop, n_fft = int(0.025 * sampling_rate), int(0.010 * sampling_rate), 512
    if x.size < frame:
        x = np.pad(x, (0, frame - x.size))
    x = np.append(x[0], x[1:] - 0.97 * x[:-1])  # pre-emphasis
    n_frames = 1 + (x.size - frame) // hop
    index = np.arange(frame)[None, :] + hop * np.arange(n_frames)[:, None]
    frames = x[index] * np.hamming(frame)
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2 / n_fft
    log_mel = np.log(power @ _mel_filterbank(sampling_rate, n_fft, n_mels).T + 1e-10)
    k = np.arange(n_mels)
    dct = np.cos(np.pi / n_mels * (k[None, :] + 0.5) * np.arange(n_mfcc)[:, None])  # DCT-II basis
    mfcc = log_mel @ dct.T
    delta = np.gradient(mfcc, axis=0) if n_frames > 1 else np.zeros_like(mfcc)
    log_energy = np.log(power.sum(axis=1) + 1e-10)
    stats = [mfcc.mean(0), mfcc.std(0), mfcc.min(0), mfcc.max(0), delta.mean(0), delta.std(0)]
    energy = [log_energy.mean(), log_energy.std(), log_energy.max() - log_energy.min(), float((log_energy > log_energy.mean()).mean())]
    return np.concatenate(stats + [np.asarray(energy)]).astype(np.float32)


SVM_C_GRID = (0.003, 0.01, 0.03, 0.1)


def _svm(C: float, seed: int):
    return make_pipeline(StandardScaler(), LinearSVC(C=C, max_iter=20000, random_state=seed))


def _pick_C(features: np.ndarray, labels: np.ndarray, speakers: np.ndarray, grid: Sequence[float], seed: int) -> float:
    """Inner leave-one-speaker-out over the training speakers only: the C with the best pooled wF1."""
    best_C, best_f1 = grid[0], -1.0
    for C in grid:
        pred = np.empty_like(labels)
        for speaker in np.unique(speakers):
            held = speakers == speaker
            pred[held] = _svm(C, seed).fit(features[~held], labels[~held]).predict(features[held])
        f1 = f1_score(labels, pred, average="weighted")
        if f1 > best_f1:
            best_C, best_f1 = C, f1
    return best_C


def speaker_independent_svm(
    features: np.ndarray, labels: Sequence, speakers: Sequence, C: float | None = None, seed: int = 0
) -> dict[str, float]:
    """Leave-one-speaker-out linear SVM; predictions of every fold pooled, then wF1 / UAR / accuracy.

    ``C=None`` picks C per outer fold by an inner leave-speaker-out on that fold's training speakers
    (nested: the held-out speaker never influences its own C); a number fixes C.
    """
    features = np.asarray(features)
    labels = np.asarray(labels)
    speakers = np.asarray(speakers)
    if not (len(features) == len(labels) == len(speakers)):
        raise ValueError("speaker_independent_svm: features, labels and speakers differ in length")
    if len(np.unique(speakers)) < 2:
        raise ValueError("speaker_independent_svm: need at least 2 speakers for leave-speaker-out folds")
    pred = np.empty_like(labels)
    chosen = []
    for speaker in np.unique(speakers):
        test = speakers == speaker
        fold_C = C if C is not None else _pick_C(features[~test], labels[~test], speakers[~test], SVM_C_GRID, seed)
        chosen.append(fold_C)
        pred[test] = _svm(fold_C, seed).fit(features[~test], labels[~test]).predict(features[test])
    scores = _scores(labels, pred)
    scores["folds"] = int(len(np.unique(speakers)))
    scores["C_selection"] = "nested leave-speaker-out" if C is None else "fixed"
    scores["C_per_fold"] = ",".join(f"{c:g}" for c in chosen)
    return scores
