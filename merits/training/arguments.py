"""Every option of ``train.py``: one dataclass, filled from a YAML file then from ``--key value`` overrides.

```python
from merits.training.arguments import parse_args

args = parse_args(["--config", "configs/meld_merits-l.yaml", "--context.learning_rate", "5e-5"])
```

A YAML file holds the same keys as :class:`TrainingArguments`; the per-stage settings are nested
mappings (``utterance:``, ``speech_head:``, ``context:``, ``fusion:``, ``moe:``, ``pretrain:``) of
:class:`StageArguments`. On the command line a nested key is written with a dot
(``--utterance.num_epochs 3``). Values are converted to the field's type, so ``1e-4`` is a float even
though YAML 1.1 reads it as a string. Unknown keys are refused with the file (or flag) that holds them.

A YAML file may start from another one: ``inherit: ../meld_mister-e.yaml`` (a path relative to the
inheriting file) reads that file first (itself possibly inheriting), then this file's keys on top; mappings
(``model:``, ``dataset_options:``, the stage settings, a per-system ``model: {mister-e: ...}``) merge key by key, any
other value (lists included) replaces the inherited one (``configs/ablations/`` is built this way).

Relative paths in a YAML file are relative to the repository root (the folder holding ``train.py``):
``data_dir: ../shared/data/meld`` works from any working directory. The environment variable
``MERITS_SHARED_DATA`` replaces the ``../shared/data`` prefix (tests and other machines use it).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SHARED_DATA_PREFIX = "../shared/data"

ARCHITECTURES = ("merits-l", "mister-e")
STAGE_NAMES = ("pretrain", "utterance", "context", "fusion", "context+fusion", "moe")
MODALITIES = ("text", "audio")


class ConfigError(ValueError):
    """A configuration file or command-line override is wrong; the message names the key and its source."""


class HelpRequested(Exception):
    """``--help`` / ``-h`` on the command line: the message is the usage text (print it and exit 0)."""


@dataclass
class StageArguments:
    """Optimisation settings of one training stage.

    ``batch_size`` is the *effective* batch: utterances for the ``pretrain`` and ``utterance``
    stages, conversations for the others. It is split over processes and gradient-accumulation
    steps, so a 2-process run sees the same effective batch as a 1-process run.
    """

    num_epochs: int = 50  # passes over the training split
    learning_rate: float = 1e-4  # learning rate (constant; with warmup_ratio > 0, linear warm-up then linear decay)
    batch_size: int = 32  # effective batch: utterances (pretrain, utterance) or conversations (the others)
    gradient_accumulation_steps: int = 1  # the batch is split over this many steps per update
    optimizer: str = "adamw"  # "adamw" | "adam"
    weight_decay: float = 0.01  # decoupled (adamw) or L2 (adam) weight decay
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.999  # Adam's second-moment decay
    adam_epsilon: float = 1e-8  # Adam's denominator epsilon
    warmup_ratio: float = 0.0  # fraction of the updates spent warming the learning rate up (0: constant rate)
    max_grad_norm: Optional[float] = 1.0  # gradient clipping norm (null: no clipping)
    early_stopping_patience: Optional[int] = None  # epochs without a better validation wF1
    # batches of conversations of similar length, in a random order (merits.training.loop.LengthGroupedSampler):
    # less padding computed per real turn. Default on for the conversation stages (context, fusion, moe), off for
    # pretrain / utterance (one-turn items; when on there, they are grouped by text length)
    group_by_length: bool = True


def _stage(**overrides) -> StageArguments:
    return StageArguments(**overrides)


@dataclass
class TrainingArguments:
    """All options of ``train.py``. Defaults: the papers' values (shared/spec/papers.md)."""

    # --- run ---
    config: Optional[str] = None  # YAML file read before the overrides
    output_dir: str = "outputs/demo"  # results, plots and best/ (default with --config X: outputs/X)
    overwrite_output_dir: bool = False  # allow writing into a folder that holds another run
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    seed: int = 42  # seeds the initial weights, the data order and dropout
    mixed_precision: str = "no"  # "no" | "bf16"
    torch_num_threads: Optional[int] = None  # intra-op CPU threads per process (None: torch's default); 1 suits tiny models
    checkpointing_steps: int = 200  # accelerator.save_state every N optimiser steps (and at every epoch end)
    logging_steps: int = 10  # log the training loss every N optimiser steps
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    push_to_hub: bool = False  # upload OUT/best to the Hub at the end (needs --hub_model_id and `hf auth login`)
    hub_model_id: Optional[str] = None  # the Hub repo id for --push_to_hub (e.g. your-name/merits-l-meld)
    debug_exit_after_step: Optional[int] = None  # tests: hard-exit (like a kill) after this global step

    # --- system ---
    architecture: str = "both"  # "merits-l" | "mister-e" | "both" (each system trained in OUT/<architecture>)
    stages: Optional[list] = None  # default: utterance, context, fusion (merits-l) / utterance, moe (mister-e)
    joint_context_fusion: bool = False  # merits-l ablation: train stages II and III jointly
    modalities: list = field(default_factory=lambda: list(MODALITIES))  # text, audio or both
    model: dict = field(default_factory=dict)  # MeritsConfig hyperparameters (ablation switches, sizes)

    # --- data ---
    dataset: str = "demo"  # demo | meld | mosi | iemocap | emodb | msp_podcast | pseudo_labels | features
    data_dir: Optional[str] = None  # the corpus folder (its official layout; see merits.data)
    dataset_options: dict = field(default_factory=dict)  # keyword arguments of the dataset loader
    train_features: Optional[str] = None  # feature datasets (api.md section 5): stages II/III or the MoE only
    validation_features: Optional[str] = None  # feature dataset of the validation split (model selection)
    test_features: Optional[str] = None  # feature dataset of the test split (scored once, with the selected model)
    max_train_dialogues: Optional[int] = None  # quick runs: keep the first N conversations of each split
    max_eval_dialogues: Optional[int] = None  # quick runs: keep the first N conversations of validation and test
    cache_dir: Optional[str] = None  # embedding cache (default OUT/cache)
    # stage I embedding cache batches (merits.data.cache.length_batches): at most this many utterances and padded
    # positions (text tokens + speech frames at 50/s) per forward pass. On a CPU with a raw speech backbone,
    # embedding_max_tokens: 1 (one utterance per pass) was faster than batching (bench/README.md, extraction) and
    # avoids padding the group-norm feature encoders of wav2vec2-style models; None = fixed batches.
    embedding_batch_size: int = 32  # at most this many utterances per stage I embedding pass
    embedding_max_tokens: Optional[int] = 8192  # at most this many padded positions per embedding pass (null: no bound)

    # --- text utterance encoder ---
    text_model_name_or_path: Optional[str] = None  # pretrained backbone (e.g. roberta-large), local path or hub id
    text_config: Optional[dict] = None  # backbone config for an encoder trained from scratch
    tokenizer_name_or_path: Optional[str] = None  # tokenizer (default: the text backbone's)
    train_tokenizer: bool = False  # train a tokenizer on the training transcripts (from-scratch encoders)
    tokenizer_vocab_size: int = 4000  # vocabulary of a tokenizer trained with --train_tokenizer
    max_text_length: int = 128  # tokens per utterance (longer ones are truncated)
    text_encoder_init: Optional[str] = None  # stage 0 output (Hub folder): initialise the text encoder from it
    # stage I text classifier: "random" or "linear_probe" (LP-FT: a logistic regression on the frozen encoder's features,
    # C chosen on validation, copied into the head before fine-tuning; merits.training.linear_probe)
    text_head_init: str = "random"
    use_lora: bool = False  # LoRA (peft) on the text backbone; merged before saving
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.1  # dropout on the LoRA branch
    lora_target_modules: Optional[list] = None  # module names LoRA wraps (null: peft's default for the backbone)

    # --- speech utterance encoder ---
    audio_model_name_or_path: Optional[str] = None  # pretrained frozen speech backbone (e.g. a WavLM/CARE folder)
    audio_config: Optional[dict] = None  # speech backbone config (random init; tests)
    audio_features: Optional[str] = "acoustic"  # "acoustic": speech head on MeritsAcousticFeatureExtractor statistics
    # stage I with a speech backbone on waveforms: train on a random window of this many seconds of each utterance
    # (MiSTER-E's speech encoder: 5 s, papers.md §4.2); None = whole utterances. Never applied to evaluation or to the
    # embeddings of the later stages; not to precomputed acoustic statistics (they are computed once per utterance)
    audio_train_crop_seconds: Optional[float] = None
    # stage I trains the text encoder and the speech head as separate models (papers: RoBERTa-FT vs the CARE head;
    # the two MiSTER-E LLMs): the speech head's own optimiser group (`speech_head:` learning rate, weight decay, betas,
    # eps, warm-up, gradient clipping) instead of the text encoder's `utterance:` settings. Batches and epochs stay
    # shared (one pass over the utterances; each head keeps its own best epoch). A speech-only stage I uses `utterance:`
    separate_speech_head_optimizer: bool = True

    # --- leave-one-speaker-out model selection (corpora with no validation split, e.g. EmoDB) ---
    speaker_folds: bool = False  # stage I speech head: every speaker held out once (test), the next one validates
    speaker_column: str = "speaker"  # the column naming each utterance's speaker (speaker_folds only)
    # speaker folds: after the choice on the validation speaker (candidate, epochs), retrain on training + validation
    # speakers and test that model (a linear probe refits on both after choosing C); False: test the chosen model itself
    fold_refit: bool = False
    fold_candidates: Optional[list] = None  # settings compared on the folds: mappings of options ({"utterance.learning_rate": 1e-3})
    # speaker folds on a frozen speech backbone: every training clip is added again at each of these speeds (Kaldi-style
    # speed perturbation, tempo and pitch together, e.g. [0.9, 1.1]; merits.data.audio.speed_perturb), its pooled
    # layers computed once per speed and cached. Validation and test clips are never perturbed; null: none
    audio_speed_perturbation: Optional[list] = None

    # --- stages ---
    pretrain: StageArguments = field(
        default_factory=lambda: _stage(num_epochs=10, learning_rate=2e-5, warmup_ratio=0.1, group_by_length=False)
    )
    # the official utterance-encoder code (CARE head, MiSTER-E LLMs) does not clip gradients
    utterance: StageArguments = field(default_factory=lambda: _stage(group_by_length=False, max_grad_norm=None))
    # the speech head's optimiser group in stage I (separate_speech_head_optimizer): the CARE head, Adam lr 1e-4 (§2.3)
    speech_head: StageArguments = field(
        default_factory=lambda: _stage(learning_rate=1e-4, optimizer="adam", weight_decay=0.0, max_grad_norm=None,
                                       group_by_length=False)
    )
    context: StageArguments = field(default_factory=StageArguments)
    fusion: StageArguments = field(default_factory=StageArguments)
    moe: StageArguments = field(
        default_factory=lambda: _stage(num_epochs=100, learning_rate=1e-5, batch_size=8, optimizer="adam", weight_decay=0.0)
    )

    # ------------------------------------------------------------------
    def architectures(self) -> list[str]:
        return list(ARCHITECTURES) if self.architecture == "both" else [self.architecture]

    def stages_for(self, architecture: str) -> list[str]:
        """The stages trained for ``architecture``, in order."""
        if self.stages:
            return list(self.stages)
        if self.dataset == "pseudo_labels":
            return ["pretrain"]
        features_only = self.train_features is not None
        if architecture == "mister-e":
            return ["moe"] if features_only else ["utterance", "moe"]
        later = ["context+fusion"] if self.joint_context_fusion else ["context", "fusion"]
        if len(self.modalities) < 2:
            later = ["context"]
        return later if features_only else ["utterance"] + later

    def stage_arguments(self, stage: str) -> StageArguments:
        if stage in ("context+fusion",):
            return self.context
        return getattr(self, stage)

    def source_of(self, *keys: str) -> str:
        """Where the value of ``keys`` (the first one set) came from: ``--key`` on the command line, the config file,
        or the defaults. Errors name it, so a bad value from the command line is not blamed on the YAML file."""
        sources = getattr(self, "_sources", {})
        for key in keys:
            for candidate in (key, key.split(".")[0]):
                if candidate in sources:
                    return sources[candidate]
        return "defaults" if self.config is None else f"{self.config} (or its defaults)"

    def validate(self) -> "TrainingArguments":
        src = self.source_of
        if self.architecture not in ARCHITECTURES + ("both",):
            raise ConfigError(f"{src('architecture')}: architecture must be one of {ARCHITECTURES + ('both',)}, got {self.architecture!r}")
        for modality in self.modalities:
            if modality not in MODALITIES:
                raise ConfigError(f"{src('modalities')}: modalities: unknown modality {modality!r}; expected {MODALITIES}")
        if not self.modalities:
            raise ConfigError(f"{src('modalities')}: modalities is empty")
        for stage in self.stages or []:
            if stage not in STAGE_NAMES:
                raise ConfigError(f"{src('stages')}: stages: unknown stage {stage!r}; expected some of {STAGE_NAMES}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"{src('mixed_precision')}: mixed_precision must be 'no' or 'bf16' (fp16 needs a GPU), got {self.mixed_precision!r}")
        if self.train_features is not None and self.validation_features is None:
            raise ConfigError(f"{src('train_features')}: --train_features needs --validation_features (model selection uses validation only)")
        if self.train_features is not None and self.architecture == "both":
            raise ConfigError(f"{src('architecture', 'train_features')}: feature-only training needs --architecture merits-l or mister-e")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError(f"{src('push_to_hub')}: --push_to_hub needs --hub_model_id")
        if self.speaker_folds:
            if self.architecture == "both" or self.train_features is not None:
                raise ConfigError(f"{src('speaker_folds')}: speaker_folds needs one architecture (merits-l or mister-e) and a corpus, not --train_features")
            if self.stages not in (None, ["utterance"]) or list(self.modalities) != ["audio"]:
                raise ConfigError(f"{src('speaker_folds')}: speaker_folds trains the stage I speech head only (modalities: [audio], stages: [utterance])")
            if ((self.audio_model_name_or_path is not None or self.audio_config is not None)
                    and not (self.model or {}).get("standardize_speech_layers", False)):
                raise ConfigError(f"{src('speaker_folds', 'audio_model_name_or_path')}: speaker folds on a speech backbone "
                                  "need model.standardize_speech_layers: true (the head's per-layer standardisation must "
                                  "live in the model, which reads raw audio)")
            if self.audio_speed_perturbation is not None:
                speeds = self.audio_speed_perturbation
                if (not isinstance(speeds, (list, tuple)) or not speeds
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.5 <= v <= 2 and v != 1 for v in speeds)):
                    raise ConfigError(f"{src('audio_speed_perturbation')}: audio_speed_perturbation must be a list of speeds "
                                      f"between 0.5 and 2 other than 1 (e.g. [0.9, 1.1]), got {speeds!r}")
                if self.audio_model_name_or_path is None and self.audio_config is None:
                    raise ConfigError(f"{src('audio_speed_perturbation')}: audio_speed_perturbation needs a speech backbone "
                                      "(audio_model_name_or_path); the acoustic statistics are computed once per utterance")
            for index, candidate in enumerate(self.fold_candidates or []):
                if not isinstance(candidate, dict):
                    raise ConfigError(f"{src('fold_candidates')}: fold_candidates[{index}] must be a mapping of options, got {candidate!r}")
        if self.text_head_init not in ("random", "linear_probe"):
            raise ConfigError(f"{src('text_head_init')}: text_head_init must be 'random' or 'linear_probe', got {self.text_head_init!r}")
        if self.audio_speed_perturbation is not None and not self.speaker_folds:
            raise ConfigError(f"{src('audio_speed_perturbation')}: audio_speed_perturbation is applied by speaker_folds only")
        if self.embedding_batch_size <= 0:
            raise ConfigError(f"{src('embedding_batch_size')}: embedding_batch_size must be positive, got {self.embedding_batch_size}")
        if self.embedding_max_tokens is not None and self.embedding_max_tokens <= 0:
            raise ConfigError(f"{src('embedding_max_tokens')}: embedding_max_tokens must be positive (or null), got {self.embedding_max_tokens}")
        if self.torch_num_threads is not None and self.torch_num_threads <= 0:
            raise ConfigError(f"{src('torch_num_threads')}: torch_num_threads must be positive, got {self.torch_num_threads}")
        if self.checkpointing_steps <= 0:
            raise ConfigError(f"{src('checkpointing_steps')}: checkpointing_steps must be positive")
        if self.audio_train_crop_seconds is not None and self.audio_train_crop_seconds <= 0:
            raise ConfigError(f"{src('audio_train_crop_seconds')}: audio_train_crop_seconds must be positive (or null), got {self.audio_train_crop_seconds}")
        head, text = self.speech_head, self.utterance
        if head.optimizer != text.optimizer and head.weight_decay > 0 and text.weight_decay > 0:
            raise ConfigError(
                f"{src('speech_head.optimizer', 'utterance.optimizer')}: speech_head.optimizer {head.optimizer!r} differs from utterance.optimizer {text.optimizer!r} "
                "with weight decay in both: the two groups share one optimiser (Adam and AdamW agree only without "
                "weight decay); make them equal or set one weight_decay to 0"
            )
        import math

        for name in ("pretrain", "utterance", "speech_head", "context", "fusion", "moe"):
            stage = getattr(self, name)
            for key in ("batch_size", "num_epochs", "gradient_accumulation_steps"):
                if getattr(stage, key) <= 0:
                    raise ConfigError(f"{src(f'{name}.{key}')}: {name}.{key} must be positive, got {getattr(stage, key)}")
            if stage.optimizer not in ("adam", "adamw"):
                raise ConfigError(f"{src(f'{name}.optimizer')}: {name}.optimizer must be 'adam' or 'adamw', got {stage.optimizer!r}")
            # checked here, before any data is loaded or any folder written
            if not (math.isfinite(stage.learning_rate) and stage.learning_rate > 0):
                raise ConfigError(f"{src(f'{name}.learning_rate')}: {name}.learning_rate must be a positive number, got {stage.learning_rate}")
            if not (math.isfinite(stage.weight_decay) and stage.weight_decay >= 0):
                raise ConfigError(f"{src(f'{name}.weight_decay')}: {name}.weight_decay must be >= 0, got {stage.weight_decay}")
            if not 0 <= stage.warmup_ratio < 1:
                raise ConfigError(f"{src(f'{name}.warmup_ratio')}: {name}.warmup_ratio must be in [0, 1), got {stage.warmup_ratio}")
            if stage.max_grad_norm is not None and not stage.max_grad_norm > 0:
                raise ConfigError(f"{src(f'{name}.max_grad_norm')}: {name}.max_grad_norm must be positive (or null), got {stage.max_grad_norm}")
            if stage.early_stopping_patience is not None and stage.early_stopping_patience < 1:
                raise ConfigError(f"{src(f'{name}.early_stopping_patience')}: {name}.early_stopping_patience must be >= 1 (or null)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading and overriding
# ----------------------------------------------------------------------------------------------
_PATH_KEYS = (
    "output_dir",
    "data_dir",
    "train_features",
    "validation_features",
    "test_features",
    "cache_dir",
    "text_encoder_init",
    "tokenizer_name_or_path",
    "text_model_name_or_path",
    "audio_model_name_or_path",
)


# keys that take a Hub model id ("roberta-large", "Qwen/Qwen2.5-7B") as well as a local folder
_HUB_ID_KEYS = ("tokenizer_name_or_path", "text_model_name_or_path", "audio_model_name_or_path")


def _is_hub_id(value: str, base: Path) -> bool:
    """``roberta-large`` / ``org/name`` that is not an existing local folder: kept as given, never made a path."""
    text = str(value)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or (base / text).exists():
        return False
    return True


def resolve_path(value: str | None, base: Path = REPO_ROOT) -> str | None:
    """A config path: ``../shared/data`` honours ``MERITS_SHARED_DATA``; other relative paths are taken from ``base``."""
    if value is None:
        return None
    text = str(value)
    shared = os.environ.get("MERITS_SHARED_DATA")
    if shared and (text == SHARED_DATA_PREFIX or text.startswith(SHARED_DATA_PREFIX + "/")):
        return str(Path(shared) / text[len(SHARED_DATA_PREFIX) + 1 :]) if text != SHARED_DATA_PREFIX else shared
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = (base / path).resolve()
    return str(candidate)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp, key: str, source: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the field type ``tp``."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if optional or tp in (dict, list):
            return None
        raise ConfigError(f"{source}: {key} may not be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError("not a boolean")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("a boolean is not an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp in (list,) or typing.get_origin(tp) is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
                value = parsed
            if not isinstance(value, list):
                raise ValueError("not a list")
            return list(value)
        if tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError("not a mapping")
            glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
            if glued:
                name, _, number = glued[0].partition(":")
                raise ValueError(f"{glued[0]!r} has no value: YAML needs a space after the colon, "
                                 f"write {{{name}: {number}}}")
            return dict(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {key}: cannot read {value!r} as {getattr(tp, '__name__', tp)} ({error})") from None
    return value


def _apply(args: TrainingArguments, key: str, value: Any, source: str, base: Path) -> None:
    types_ = _field_types(TrainingArguments)
    head, _, rest = key.partition(".")
    if not hasattr(args, "_sources"):
        args._sources = {}
    args._sources[key] = source
    if head not in types_:
        raise ConfigError(f"{source}: unknown option {key!r}")
    tp = types_[head]
    if tp is StageArguments:
        stage: StageArguments = getattr(args, head)
        if not rest:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {head} must be a mapping of stage settings")
            for sub_key, sub_value in value.items():
                _apply(args, f"{head}.{sub_key}", sub_value, source, base)
            return
        stage_types = _field_types(StageArguments)
        if rest not in stage_types:
            raise ConfigError(f"{source}: unknown option {key!r} (stage settings: {sorted(stage_types)})")
        setattr(stage, rest, _coerce(value, stage_types[rest], key, source))
        return
    if rest:
        if _strip_optional(tp)[0] is not dict:
            raise ConfigError(f"{source}: {head!r} has no sub-option {rest!r}")
        current = dict(getattr(args, head) or {})
        current[rest] = yaml.safe_load(value) if isinstance(value, str) else value
        setattr(args, head, current)
        return
    value = _coerce(value, tp, key, source)
    if head in _PATH_KEYS and value is not None and not (head in _HUB_ID_KEYS and _is_hub_id(value, base)):
        value = resolve_path(value, base)
    setattr(args, head, value)


INHERIT_KEY = "inherit"


def _merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``: mappings merge recursively, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """The options of a YAML file, with its ``inherit:`` chain resolved (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        where = f" (inherited by {_chain[-1]})" if _chain else ""
        raise ConfigError(f"{path}: configuration file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    parent = data.pop(INHERIT_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: {INHERIT_KEY} must be the path of one YAML file, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if parent_path in _chain or parent_path == path.resolve():
        raise ConfigError(f"{path}: {INHERIT_KEY} {parent} makes a cycle ({' -> '.join(str(p) for p in _chain + (parent_path,))})")
    return _merge(load_yaml(parent_path, _chain + (path.resolve(),)), data)


def parse_cli(argv: list[str]) -> list[tuple[str, Any]]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs in order (values stay strings)."""
    bool_keys = {name for name, tp in _field_types(TrainingArguments).items() if tp is bool}
    pairs: list[tuple[str, Any]] = []
    i = 0
    if any(token in ("--help", "-h") for token in argv):
        raise HelpRequested(usage())
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"command line: expected --option, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        elif key in bool_keys:
            value = True
            i += 1
        else:
            raise ConfigError(f"command line: --{key} needs a value")
        pairs.append((key.replace("-", "_") if "." not in key else key, value))
    return pairs


def parse_args(argv: list[str] | None = None, default_config: Path | None = DEFAULT_CONFIG) -> TrainingArguments:
    """Build :class:`TrainingArguments` from ``--config FILE`` (or ``default_config`` when none is given) and overrides.

    The feature-only form (``--train_features``) and an explicit ``--config`` never read the default file.
    """
    argv = list(argv or [])
    pairs = parse_cli(argv)
    keys = {k for k, _ in pairs}
    config_path = dict(pairs).get("config")
    if config_path is None and default_config is not None and "train_features" not in keys and Path(default_config).is_file():
        config_path = str(default_config)
    args = TrainingArguments()
    if config_path is not None:
        config_file = Path(config_path)
        if not config_file.is_absolute() and not config_file.is_file():
            config_file = REPO_ROOT / config_file
        args.config = str(config_file)
        for key, value in load_yaml(config_file).items():
            _apply(args, str(key), value, str(config_file), REPO_ROOT)
        if "output_dir" not in keys and "output_dir" not in load_yaml(config_file):
            args.output_dir = str(Path("outputs") / config_file.stem)
    for key, value in pairs:
        if key == "config":
            continue
        _apply(args, key, value, f"--{key}", Path.cwd())
    return args.validate()


def field_help() -> dict[str, tuple[str, str]]:
    """``{option: (section, description)}`` for every field of :class:`TrainingArguments` and :class:`StageArguments`
    (stage options as ``stage.<name>``): the comment on the field's line, else the comment lines just above it. The
    ``# --- name ---`` lines are the sections."""
    import ast

    source = Path(__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    out: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in ("TrainingArguments", "StageArguments")):
            continue
        section = "stage settings" if node.name == "StageArguments" else "options"
        previous_end = node.lineno
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                previous_end = getattr(item, "end_lineno", previous_end)
                continue
            above, inline = [], ""
            for number in range(previous_end + 1, item.lineno):  # the lines between the previous field and this one
                text = lines[number - 1].strip()
                heading = text.strip("# ").strip()
                if text.startswith("# ---") and text.endswith("---"):
                    section, above = heading.strip("- ").strip(), []
                elif text.startswith("#"):
                    above.append(heading)
                elif not text:
                    above = []
            first = lines[item.lineno - 1]
            if "#" in first:
                inline = first.split("#", 1)[1].strip()
            name = item.target.id if node.name == "TrainingArguments" else f"stage.{item.target.id}"
            out[name] = (section, inline or " ".join(above))
            previous_end = item.end_lineno or item.lineno
    return out


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)) and not value:
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)


def usage() -> str:
    """``train.py --help``: every option with its description, its default and (when it differs) configs/demo.yaml's
    value, then the stage settings with each stage's default."""
    import textwrap

    helps = field_help()
    defaults = TrainingArguments()
    demo = load_yaml(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else {}
    stage_fields = [f.name for f in dataclasses.fields(StageArguments)]
    stage_names = [f.name for f in dataclasses.fields(TrainingArguments) if _field_types(TrainingArguments)[f.name] is StageArguments]
    wrap = lambda text: textwrap.fill(text, width=110, initial_indent="      ", subsequent_indent="      ")
    out = [
        "usage: train.py [--config FILE] [--KEY VALUE ...]",
        "",
        "Train MERITS-L and/or MiSTER-E, every stage, with Accelerate (`accelerate launch train.py ...`, or",
        "`torchrun --nproc_per_node N train.py ...` for N CPU processes). With no arguments: configs/demo.yaml, both",
        "systems on the built-in demo corpus, written to outputs/demo. Every option below can be set in a --config",
        "YAML file under the same name; the command line wins (`--key value`, `--key=value`, `--flag` for true).",
        "Nested keys take a dot: `--model.gate_mode vote`, `--context.learning_rate 5e-5`. `default` is the value",
        "when neither a file nor the command line sets it; `demo.yaml` is the value of the no-argument run.",
    ]
    section = None
    for f in dataclasses.fields(TrainingArguments):
        if f.name in stage_names:
            continue
        where, description = helps.get(f.name, ("options", ""))
        if where != section:
            section = where
            out += ["", f"{section}:"]
        tp = _strip_optional(_field_types(TrainingArguments)[f.name])[0]
        kind = getattr(tp, "__name__", str(tp)).upper()
        value = getattr(defaults, f.name)
        note = f"default: {_shown(value)}"
        if f.name in demo and demo[f.name] != value and not isinstance(demo[f.name], dict):
            note += f"; demo.yaml: {_shown(demo[f.name])}"
        elif f.name in demo and isinstance(demo[f.name], dict):
            note += "; demo.yaml sets it"
        out.append(f"  --{f.name} {kind}")
        out.append(wrap(f"{description} ({note})" if description else f"({note})"))
    out += ["", f"stage settings (--<stage>.<option>, stage one of {', '.join(stage_names)}):"]
    for name in stage_fields:
        description = helps.get(f"stage.{name}", ("", ""))[1]
        per_stage = {stage: getattr(getattr(defaults, stage), name) for stage in stage_names}
        if len(set(map(repr, per_stage.values()))) == 1:
            note = f"default: {_shown(next(iter(per_stage.values())))}"
        else:
            note = "defaults: " + ", ".join(f"{stage} {_shown(v)}" for stage, v in per_stage.items())
        tp = _strip_optional(_field_types(StageArguments)[name])[0]
        out.append(f"  --<stage>.{name} {getattr(tp, '__name__', str(tp)).upper()}")
        out.append(wrap(f"{description} ({note})" if description else f"({note})"))
    out += ["", "  --help, -h", "      show this help and exit", ""]
    return "\n".join(out)
