"""Stage I text head initialised from a linear probe (LP-FT), ``text_head_init: linear_probe``.

Fine-tuning a pretrained encoder under a randomly initialised classifier first back-propagates the random head's
large errors into the encoder, which distorts the pretrained features before the head has learnt anything (Kumar et
al., 2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", LP-FT). The remedy:
fit the classifier as a logistic regression on the frozen encoder's features (a linear probe), then fine-tune
everything from there. Fine-tuning then starts from the frozen-encoder + logistic regression baseline's own solution.

:func:`init_text_head_from_probe` reads the features the text classifier reads (the pooled embedding, or the
activated projection where there is one) with the encoder in eval mode over the training utterances, fits
multinomial L2 logistic regressions (scikit-learn, ``C`` over a grid), keeps the ``C`` with the best validation
weighted F1 (validation alone selects, as everywhere) and copies its weights into ``text_encoder.classifier``.
Deterministic: every process of a distributed run computes the same head.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from ..metrics import compute_erc_metrics
from .loop import IGNORE_INDEX


logger = logging.getLogger("merits.training")

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


@torch.no_grad()
def classifier_inputs(model, items: Sequence, collate_fn: Callable, batch_size: int = 64,
                      device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of ``model.text_encoder.classifier`` (eval mode: no dropout) and the labels of every labelled
    utterance of ``items`` (1-turn conversations, as stage I holds them): ``([N, D] float32, [N] int64)``."""
    encoder = model.text_encoder
    captured: list[torch.Tensor] = []
    hook = encoder.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().cpu()))
    was_training = encoder.training
    original_device = next(encoder.parameters()).device
    device = torch.device(device) if device is not None else original_device
    encoder.eval().to(device)
    features, labels = [], []
    try:
        for start in range(0, len(items), batch_size):
            batch = collate_fn(list(items[start:start + batch_size]))
            # the encoder reads every real turn (row-major; a turn without text as an empty string)
            real = batch["turn_mask"].bool()
            batch_labels = batch["labels"][real]
            scored = batch_labels != IGNORE_INDEX
            if "text_mask" in batch:
                scored &= batch["text_mask"][real].bool()
            captured.clear()
            encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            features.append(captured[0][scored])
            labels.append(batch_labels[scored])
    finally:
        hook.remove()
        encoder.train(was_training).to(original_device)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def init_text_head_from_probe(model, train_items: Sequence, validation_items: Sequence, collate_fn: Callable,
                              label_names: Sequence[str], device=None, c_grid: Sequence[float] = PROBE_C_GRID,
                              seed: int = 0) -> dict:
    """Fit the linear probe on ``train_items``, choose ``C`` on ``validation_items``, copy it into the text
    classifier. Returns ``{"C": chosen, "validation_weighted_f1": ..., "per_C": {C: validation wF1}}``."""
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = classifier_inputs(model, train_items, collate_fn, device=device)
    x_val, y_val = classifier_inputs(model, validation_items, collate_fn, device=device)
    classes = np.arange(len(label_names))
    if len(np.unique(y_train)) < 2:
        raise ValueError("text_head_init: linear_probe needs at least two classes among the training labels")
    per_c, best = {}, None
    for c in c_grid:
        probe = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, y_train)
        score = compute_erc_metrics(probe.predict(x_val), y_val, label_names=label_names)["weighted_f1"]
        per_c[float(c)] = float(score)
        if best is None or score > best[0]:
            best = (score, c, probe)
    score, c, probe = best
    weight = np.zeros((len(classes), x_train.shape[1]), dtype=np.float32)
    bias = np.zeros(len(classes), dtype=np.float32)
    if len(probe.classes_) == 2 and probe.coef_.shape[0] == 1:  # binary: one logit difference, split symmetrically
        weight[probe.classes_[1]], bias[probe.classes_[1]] = probe.coef_[0] / 2, probe.intercept_[0] / 2
        weight[probe.classes_[0]], bias[probe.classes_[0]] = -probe.coef_[0] / 2, -probe.intercept_[0] / 2
    else:
        weight[probe.classes_], bias[probe.classes_] = probe.coef_, probe.intercept_
        # a class absent from the training labels keeps a logit far below the others
        absent = np.setdiff1d(classes, probe.classes_)
        bias[absent] = float(probe.intercept_.min()) - 10.0
    classifier = model.text_encoder.classifier
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(weight))
        classifier.bias.copy_(torch.from_numpy(bias))
    logger.info("text head initialised from a linear probe: C=%g, validation weighted F1 %.2f (per C: %s)",
                c, score, {k: round(v, 2) for k, v in per_c.items()})
    return {"C": float(c), "validation_weighted_f1": float(score), "per_C": per_c}
