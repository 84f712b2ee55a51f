"""The local `evaluate` module merits/metrics/erc_metrics against scikit-learn."""

import evaluate
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from merits.metrics import ERC_METRICS_PATH, compute_erc_metrics, load_erc_metrics


def test_loads_with_evaluate_load_from_local_path():
    metric = evaluate.load(ERC_METRICS_PATH)
    result = metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], label_names=["neutral", "joy"])
    assert set(result) >= {"weighted_f1", "accuracy", "unweighted_average_recall", "macro_f1", "f1_neutral", "f1_joy"}


def test_matches_sklearn_on_random_labels():
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 4, size=200)
    preds = np.where(rng.random(200) < 0.6, refs, rng.integers(0, 4, size=200))
    names = ["angry", "happy", "sad", "neutral"]
    result = compute_erc_metrics(preds, refs, label_names=names)
    assert result["weighted_f1"] == pytest.approx(f1_score(refs, preds, average="weighted"))
    assert result["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert result["unweighted_average_recall"] == pytest.approx(recall_score(refs, preds, average="macro"))
    assert result["macro_f1"] == pytest.approx(f1_score(refs, preds, average="macro"))
    per_class = f1_score(refs, preds, average=None)
    for name, value in zip(names, per_class):
        assert result[f"f1_{name}"] == pytest.approx(value)
    assert result["num_examples"] == 200


def test_padding_is_dropped():
    with_pad = compute_erc_metrics([1, 0, 2, 2], [1, -100, 2, -100], num_labels=3)
    without = compute_erc_metrics([1, 2], [1, 2], num_labels=3)
    assert with_pad["weighted_f1"] == without["weighted_f1"] == 1.0
    assert with_pad["num_examples"] == 2


def test_wrong_predictions_score_low():
    result = compute_erc_metrics([1, 1, 0, 0], [0, 0, 1, 1], label_names=["a", "b"])
    assert result["weighted_f1"] == 0.0 and result["accuracy"] == 0.0


def test_bad_input_is_refused_clearly():
    metric = load_erc_metrics()
    with pytest.raises(ValueError, match="no labelled utterance"):
        metric.compute(predictions=[0, 1], references=[-100, -100], num_labels=2)
    with pytest.raises(ValueError, match="class ids"):
        metric.compute(predictions=[0, 5], references=[0, 1], label_names=["a", "b"])
