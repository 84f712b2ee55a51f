"""Agreement of LLM pseudo-labels with a valence oracle (papers.md §3.2 and §6 #3).

MSP-PODCAST valence is on a 1-7 scale: ``v <= 3`` is negative, ``v >= 5`` positive, anything in
between neutral. The agreement is the share of rows whose LLM label equals the oracle's label, over
the rows that have both a valence and a parsed LLM label (unparseable replies are counted apart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .llm import SENTIMENT_LABELS

ORACLE_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


def valence_to_sentiment(valence: float, negative_max: float = 3.0, positive_min: float = 5.0) -> str:
    """The oracle label of one valence value (1-7 scale by default)."""
    if negative_max >= positive_min:
        raise ValueError(f"negative_max ({negative_max}) must be below positive_min ({positive_min})")
    if valence <= negative_max:
        return "negative"
    if valence >= positive_min:
        return "positive"
    return "neutral"


@dataclass
class OracleAgreement:
    """Agreement figures; ``confusion[i][j]`` counts oracle label ``labels[i]`` given LLM label ``labels[j]``."""

    agreement: float
    compared: int
    unparsed: int
    missing_valence: int
    labels: tuple[str, ...] = ORACLE_LABELS
    confusion: list[list[int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "agreement": self.agreement,
            "compared": self.compared,
            "unparsed": self.unparsed,
            "missing_valence": self.missing_valence,
            "labels": list(self.labels),
            "confusion": self.confusion,
        }

    def format(self) -> str:
        """A printable report: agreement % and the confusion matrix (rows = oracle, columns = LLM)."""
        width = max(len(label) for label in self.labels) + 2
        lines = [
            f"oracle agreement: {100 * self.agreement:.2f}% over {self.compared} rows "
            f"({self.unparsed} unparseable replies and {self.missing_valence} rows without valence left out)",
            "confusion matrix (rows: valence oracle, columns: LLM label)",
            " " * width + "".join(f"{label:>{width}}" for label in self.labels),
        ]
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:<{width}}" + "".join(f"{count:>{width}d}" for count in row))
        return "\n".join(lines)


def oracle_agreement(
    llm_labels: Sequence[str | None],
    valences: Sequence[float | None],
    negative_max: float = 3.0,
    positive_min: float = 5.0,
) -> OracleAgreement:
    """Compare LLM labels (``None`` = unparseable) with the valence oracle, row by row."""
    if len(llm_labels) != len(valences):
        raise ValueError(f"{len(llm_labels)} labels but {len(valences)} valence values")
    index = {label: i for i, label in enumerate(ORACLE_LABELS)}
    confusion = [[0] * len(ORACLE_LABELS) for _ in ORACLE_LABELS]
    compared = agreed = unparsed = missing = 0
    for row, (label, valence) in enumerate(zip(llm_labels, valences)):
        if valence is None or (isinstance(valence, float) and math.isnan(valence)):
            missing += 1
            continue
        if label is None:
            unparsed += 1
            continue
        if label not in index:
            raise ValueError(f"row {row}: label {label!r} is not one of {SENTIMENT_LABELS}")
        oracle = valence_to_sentiment(float(valence), negative_max, positive_min)
        confusion[index[oracle]][index[label]] += 1
        compared += 1
        agreed += oracle == label
    return OracleAgreement(
        agreement=agreed / compared if compared else float("nan"),
        compared=compared,
        unparsed=unparsed,
        missing_valence=missing,
        confusion=confusion,
    )
