"""LLM pseudo-labelling for MERITS-L pre-training (issue 5): Whisper transcripts → LLM sentiment labels.

The command line is ``label_with_llm.py`` at the repository root (:func:`merits.labelling.run.main`).
Modules: :mod:`.asr` (Whisper, word error rate), :mod:`.llm` (prompt, few-shot turns, parsing, log-probability
scoring and calibration, OpenAI-compatible async client, in-process vLLM), :mod:`.writer` (resumable journals), :mod:`.oracle` (valence agreement), :mod:`.run` (the job),
:mod:`.vllm_server` (starting a local vLLM OpenAI server, for tests and benchmarks).
"""

from .llm import (
    CALIBRATIONS,
    DECODINGS,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_USER_TEMPLATE,
    SENTIMENT_LABELS,
    InProcessVLLMLabeller,
    LabelResult,
    LLMServerError,
    OpenAICompatibleLabeller,
    PromptTemplate,
    RetryPolicy,
    choice_token_budget,
    decide_label,
    label_scores_from_top_logprobs,
    mean_calibrated_labels,
    parse_label,
)
from .oracle import OracleAgreement, oracle_agreement, valence_to_sentiment
from .writer import Journal, JournalError, check_run_metadata

__all__ = [
    "CALIBRATIONS",
    "DECODINGS",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_USER_TEMPLATE",
    "SENTIMENT_LABELS",
    "InProcessVLLMLabeller",
    "Journal",
    "JournalError",
    "LLMServerError",
    "LabelResult",
    "OpenAICompatibleLabeller",
    "OracleAgreement",
    "PromptTemplate",
    "RetryPolicy",
    "check_run_metadata",
    "choice_token_budget",
    "decide_label",
    "label_scores_from_top_logprobs",
    "mean_calibrated_labels",
    "oracle_agreement",
    "parse_label",
    "valence_to_sentiment",
]
