# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""ERC metrics: weighted F1, accuracy, unweighted average recall and per-class F1.

A local `evaluate` module (the hub metrics such as ``evaluate.load("f1")`` need network access).
Load it by path:

```python
import evaluate
from merits.metrics import ERC_METRICS_PATH

metric = evaluate.load(ERC_METRICS_PATH)
metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], label_names=["neutral", "joy"])
```

Both papers report the weighted F1 over utterances (scikit-learn ``average="weighted"``), with
padded turns dropped before the metric is computed.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score


_DESCRIPTION = """
Utterance-level metrics for emotion recognition in conversations: weighted F1 (the headline
metric of MERITS-L and MiSTER-E), accuracy, unweighted average recall (macro recall, UAR),
macro F1 and the F1 of every class. Padding positions (label -100 or any negative label)
are dropped before scoring.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per utterance.
    references (`list` of `int`): gold class ids, one per utterance; negative ids (e.g. -100
        for padded turns) are dropped together with their predictions.
    label_names (`list` of `str`, optional): the name of class id i at position i. Sets the
        class set of the averages (classes absent from both lists count with F1 0 in the macro
        averages and weight 0 in the weighted one) and names the per-class keys.
    num_labels (`int`, optional): number of classes when `label_names` is not given.
Returns:
    weighted_f1, accuracy, unweighted_average_recall, macro_f1 (floats in [0, 1]),
    num_examples (int) and `f1_<label name>` for every class.
Examples:
    >>> metric = evaluate.load("merits/metrics/erc_metrics")
    >>> metric.compute(predictions=[0, 1], references=[0, 1], label_names=["a", "b"])["weighted_f1"]
    1.0
"""

_CITATION = """
@inproceedings{dutta2025merits,
  title={LLM supervised Pre-training for Multimodal Emotion Recognition in Conversations},
  author={Dutta, Soumya and Ganapathy, Sriram},
  booktitle={ICASSP},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ErcMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, label_names=None, num_labels=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        keep = references >= 0
        predictions, references = predictions[keep], references[keep]
        if references.size == 0:
            raise ValueError("erc_metrics: no labelled utterance to score (every reference is padding).")

        if label_names is not None:
            label_names = [str(name) for name in label_names]
            num_labels = len(label_names)
        if num_labels is None:
            num_labels = int(max(predictions.max(), references.max())) + 1
        if label_names is None:
            label_names = [str(i) for i in range(num_labels)]
        if references.max() >= num_labels or predictions.max() >= num_labels or predictions.min() < 0:
            raise ValueError(
                f"erc_metrics: class ids must lie in [0, {num_labels}); got references up to "
                f"{int(references.max())} and predictions in [{int(predictions.min())}, {int(predictions.max())}]."
            )
        labels = list(range(num_labels))
        # Classes that never occur in the references have no recall; only those that occur count in the UAR.
        present = sorted(set(references.tolist()))

        results = {
            "weighted_f1": float(f1_score(references, predictions, labels=labels, average="weighted", zero_division=0)),
            "accuracy": float(accuracy_score(references, predictions)),
            "unweighted_average_recall": float(
                recall_score(references, predictions, labels=present, average="macro", zero_division=0)
            ),
            "macro_f1": float(f1_score(references, predictions, labels=present, average="macro", zero_division=0)),
            "num_examples": int(references.size),
        }
        per_class = f1_score(references, predictions, labels=labels, average=None, zero_division=0)
        for name, value in zip(label_names, per_class):
            results[f"f1_{name}"] = float(value)
        return results
