# coding=utf-8
"""MERITS-L / MiSTER-E configuration.

This file is shipped to the Hugging Face Hub next to `modeling_merits.py` (remote code): it imports only
torch/transformers/numpy and never the `merits` package.

Section numbers in the docstrings refer to `shared/spec/papers.md` of the merits project.
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

ARCHITECTURES = ("merits-l", "mister-e")
STAGES = {
    "merits-l": ("utterance", "context", "fusion", "context+fusion"),
    "mister-e": ("utterance", "moe"),
}
TEXT_POOLINGS = ("cls", "mean", "attentive_stats")
GATE_MODES = ("learned", "mean", "vote")
EXPERTS = ("speech", "text", "cross_modal")
CLASSIFICATION_LOSSES = ("focal", "ce")
CONVERSATION_INITS = ("pytorch", "normal")
RECURRENCES = ("auto", "cudnn", "loop")
KL_REDUCTIONS = ("batchmean", "mean")
ACTIVATIONS = (None, "relu", "gelu", "tanh")

# Per-architecture defaults: the papers' values (§2.3, §3.5, §3.6, §4.2, §4.3, §6).
_ARCHITECTURE_DEFAULTS = {
    "merits-l": {
        "text_pooling": "cls",  # §6 #6: final-layer <s> vector
        "text_layer_norm": False,
        "utterance_embed_dim": None,  # the pooled hidden state is the embedding (1024 for roberta-large)
        "text_head_dropout": 0.1,
        "speech_head_hidden_sizes": [768, 256],  # §2.3 / §6 #7: 2304 -> 768 -> H=256
        "speech_head_activation": None,  # "no nonlinearity in the code"
        "speech_head_dropout": 0.2,
        "context_num_layers": 2,  # §3.5 / §6 #8
        "context_text_hidden_size": 512,
        "context_audio_hidden_size": 128,
        "context_dropout": 0.2,
        "fusion_input_skip": False,
        "classification_loss": "ce",  # §3.1: all stages use cross-entropy
        # the CARE head has no nonlinearity (§2.3): the exported embedding is the last hidden layer's output, as it
        # always was here (also for heads configured with an activation, e.g. configs/emodb_speech_cpu.yaml)
        "utterance_embed_before_activation": False,
    },
    "mister-e": {
        "text_pooling": "attentive_stats",  # §4.2
        "text_layer_norm": True,  # LayerNorm(hidden) before pooling, §4.2
        "utterance_embed_dim": 2048,  # §4.2 projection head: the exported 2048-d embedding
        "text_head_dropout": 0.5,
        "speech_head_hidden_sizes": [2048],  # §4.2: Linear -> 2048 -> ReLU -> Dropout 0.5 -> classifier
        "speech_head_activation": "relu",
        "speech_head_dropout": 0.5,
        "context_num_layers": 3,  # §4.3 GRUModel(2048, 512, C, 0.2, layers=3)
        "context_text_hidden_size": 512,
        "context_audio_hidden_size": 512,
        "context_dropout": 0.0,  # the code builds Dropout(0.2) but never applies it
        "fusion_input_skip": True,  # a <- a + Linear(x_a) after the blocks, §4.3
        "classification_loss": "focal",  # §4.3, gamma 3
        # §4.2: the official get_features exports fc(feat), the projection BEFORE its ReLU (the classifier reads the
        # ReLU of it); the MoE then trains on those signed embeddings
        "utterance_embed_before_activation": True,
    },
}


def speech_backbone_layers(config) -> int:
    """How many hidden states a speech backbone returns: the embedding output plus one per (encoder) layer."""
    if getattr(config, "is_encoder_decoder", False):  # Whisper: the encoder only
        return config.encoder_layers + 1
    return config.num_hidden_layers + 1


def _backbone_hidden_size(config):
    """Width of a backbone's hidden states (`hidden_size`, or `d_model` for Whisper-like models)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "d_model"):
        value = getattr(text_config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"Cannot find the hidden size of the backbone config {type(config).__name__} (model_type="
        f"{getattr(config, 'model_type', None)!r}): it has neither `hidden_size` nor `d_model`."
    )


def _as_backbone_config(value, name):
    """None | dict with `model_type` | PretrainedConfig -> None | PretrainedConfig."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"`{name}` given as a dict must contain `model_type` (got keys {sorted(value)}).")
        value.pop("transformers_version", None)
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"`{name}` must be None, a dict with `model_type` or a PretrainedConfig, got {type(value).__name__}.")


def _resolve_labels(id2label, label2id, num_labels):
    """Build `id2label` and `label2id` from each other; raise if both are given and disagree."""
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in dict(id2label).items()}
    if label2id is not None:
        label2id = {str(k): int(v) for k, v in dict(label2id).items()}
    if id2label is None and label2id is None:
        if num_labels is None:
            return None, None
        id2label = {i: f"LABEL_{i}" for i in range(int(num_labels))}
    if id2label is None:
        id2label = {v: k for k, v in label2id.items()}
        if len(id2label) != len(label2id):
            raise ValueError(f"`label2id` maps several labels to the same id: {label2id}.")
    expected = {v: k for k, v in id2label.items()}
    if len(expected) != len(id2label):
        raise ValueError(f"`id2label` gives the same name to several ids: {id2label}.")
    if label2id is not None and label2id != expected:
        raise ValueError(
            "`id2label` and `label2id` disagree: `label2id` must be the inverse of `id2label`. "
            f"From id2label={id2label} the expected label2id is {expected}, got {label2id}. "
            "Pass only one of them to build the other."
        )
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"`id2label` ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
    if num_labels is not None and int(num_labels) != len(id2label):
        raise ValueError(f"`num_labels={num_labels}` disagrees with the {len(id2label)} labels of `id2label`.")
    return id2label, expected


class MeritsConfig(PretrainedConfig):
    r"""
    Configuration of [`MeritsForConversationClassification`]: MERITS-L (§3) or MiSTER-E (§4), speech + text emotion
    recognition in conversations.

    Every size lives here; `None` arguments below take the chosen architecture's paper value.

    Args:
        architecture (`str`): `"merits-l"` (3-stage Bi-GRU + co-attention) or `"mister-e"` (mixture of experts).
        text_config (`PretrainedConfig` or `dict`, *optional*): config of the text backbone (RoBERTa, Llama, Qwen...).
            `None` = the model reads precomputed text utterance embeddings of size `text_embed_dim`.
        audio_config (`PretrainedConfig` or `dict`, *optional*): config of the (frozen) speech backbone (wav2vec2,
            HuBERT, WavLM, Whisper). `None` = precomputed `audio_features` (`audio_feature_dim`) or `audio_embeds`
            (`audio_embed_dim`).
        text_embed_dim / audio_embed_dim (`int`, *optional*): sizes of the utterance embeddings that feed the context
            encoders. Derived when the modality has an encoder; a conflicting value raises.
        audio_feature_dim (`int`, *optional*): size F of precomputed speech-head inputs (`audio_features` [.., F]).
        audio_feature_layers (`int`, *optional*): K when `audio_features` is a layer stack [.., K, F] (CARE, §2.3);
            the head mixes the K layers with softmax-normalised learned weights (`speech_layer_combination`).
        speech_layer_combination (`str`): how the head combines the K pooled layers of a backbone or a layer stack:
            "weighted_sum" (default; the CARE head of §2.3: softmax-normalised learned layer weights, [K, F] -> F) or
            "concat" (the layers side by side, [K, F] -> K*F, as a linear probe reads them: the head's first Linear
            learns its own weight for every layer and feature).
        standardize_speech_layers (`bool`): standardise each layer's time-pooled vector with a training-set mean and
            std before the layer mix (buffers `layer_mean` / `layer_std` [K, F] of the speech encoder, saved with the
            weights; set by train.py from the training utterances). For a frozen backbone (e.g. the Whisper encoder)
            or layer stacks, whose hidden states differ in scale from layer to layer. Default False.
        stage (`str`): the training stage (see docs/design.md §3). Default "fusion" (merits-l with both
            modalities), "context" (merits-l with one modality), "moe" (mister-e).
        causal (`bool`): unidirectional GRUs, left-only convolutions and causal attention (for streaming).
        experts (`list[str]`, *optional*): mister-e experts to use, a subset of ("speech", "text", "cross_modal").
        text_pooling (`str`): "cls" (merits-l), "attentive_stats" (mister-e) or "mean".
        text_layer_norm (`bool`): LayerNorm on the last hidden state before pooling (mister-e §4.2).
        attentive_pooling_hidden_size (`int`, *optional*): width of the tanh attention of attentive statistics pooling;
            `None` (default) = the backbone's hidden size, as in the official MiSTER-E code (3584 -> 3584 -> 1).
        utterance_embed_dim (`int`, *optional*): projection of the pooled text vector (mister-e: 2048, then ReLU).
        utterance_embed_before_activation (`bool`, *optional*): export the utterance embedding BEFORE the last
            activation of the text projection / speech head (the classifier still reads the activated vector).
            mister-e: True (the official `get_features` returns `fc(feat)`, §4.2); merits-l: False.
        text_head_dropout (`float`): dropout before the text classifier.
        speech_head_hidden_sizes (`list[int]`): hidden sizes of the speech head; the last one is the speech
            utterance embedding (merits-l [768, 256] §2.3; mister-e [2048]). `[]`: no hidden layer, the classifier
            reads the pooled (standardised, combined) vector, which is also the embedding (a linear probe).
        speech_head_activation (`str`, *optional*): None (the CARE head has no nonlinearity), "relu", "gelu", "tanh".
        speech_head_dropout (`float`): dropout after each hidden layer of the speech head.
        speech_head_input_dropout (`float`): dropout on the speech head's input vector (0: the papers' heads; a
            regulariser for small corpora of hand-crafted statistics, e.g. EmoDB's 408 clips).
        context_num_layers (`int`): GRU layers of the context encoders (merits-l 2, mister-e 3).
        context_text_hidden_size / context_audio_hidden_size (`int`): GRU hidden size per direction (merits-l
            512/128, mister-e 512/512); the context features are twice as wide.
        context_dropout (`float`): dropout on the context features before their classifier.
        context_conv_channels (`int`): channels of the mister-e 1/3/5 convolutions over turns (1024).
        context_conv_kernel_sizes (`list[int]`): kernel sizes of those convolutions ([1, 3, 5]).
        fusion_hidden_size (`int`): d of the co-attention (1024). fusion_num_blocks (`int`): N blocks (4).
        fusion_attention_size (`int`): width of the q/k/v projections (120). fusion_num_heads (`int`): heads (3).
        fusion_attention_dropout (`float`): 0.1. fusion_dropout (`float`): residual dropout, 0.5.
        fusion_layer_norm_eps (`float`): 1e-6. fusion_head_hidden_size (`int`): d' of the fusion classifier.
        fusion_input_skip (`bool`): add Linear(input) skips after the blocks (mister-e).
        fusion_attention_inner_projections (`bool`): False (default): each attention has q/k/v projections
            d -> `fusion_attention_size` and an output projection back to d. True: the official layout, where those
            projections feed an `nn.MultiheadAttention` with its OWN q/k/v in-projections and out-projection
            (`fusion_attention_size` -> `fusion_attention_size`, MHA's init) before the projection back to d. Same
            function class (a product of linear maps is linear), 4 x 4 more small matrices per block, another init.
        gate_hidden_size (`int`): 10. gate_temperature (`float`): τ = 2. gate_mode (`str`): "learned" | "mean" | "vote".
        classification_loss (`str`): "focal" or "ce". focal_gamma (`float`): 3 (§4.3).
        utterance_focal_gamma (`float`): focal gamma of the mister-e utterance stage (2, §4.2).
        supcon_weight (`float`): 2. supcon_temperature (`float`): 1. kl_weight (`float`): 0.1.
        kl_reduction (`str`): "batchmean" (default, the official `F.kl_div(..., reduction="batchmean")` on [B, T, C]:
            the sum over the real turns and classes divided by the number of conversations B) or "mean" (the mean
            over real turns: about T times weaker at the same `kl_weight`).
        joint_context_losses (`bool`): merits-l stage "context+fusion" (the joint ablation, Fig. 4): also add the
            two context encoders' own losses. False (default): only the fusion loss, as the paper merges the stages.
        initializer_range (`float`): std of the normal initialisation of the utterance-level linear layers (and of the
            conversation-level ones with `conversation_init="normal"`).
        conversation_init (`str`): initialisation of the conversation-level modules (context encoders, co-attention
            fusion, gate): "pytorch" (default; PyTorch's own fan-in-scaled uniform init of Linear, Conv1d and GRU, which
            the authors' code uses) or "normal" (normal(0, initializer_range) linears, Xavier GRU weights, zero biases).
        recurrence (`str`): how the context encoders run their GRUs over the real turns: "auto" (default: "cudnn" on
            any non-CPU device, "loop" on CPU), "cudnn" (`nn.GRU` over packed sequences: one cuDNN call per layer on a
            GPU) or "loop" (`MeritsGRURecurrence`: per-step loop with a hand-written backward, the fastest on a CPU).
            Both use the same `nn.GRU` parameters (same checkpoints) and compute the same function.
    """

    model_type = "merits"
    # `MeritsConfig()` without a modality is an error (see __init__); transformers up to ~5.2x builds
    # `self.__class__()` to diff against defaults (to_diff_dict / save_pretrained) unless this is set
    has_no_defaults_at_init = True

    def __init__(
        self,
        architecture="merits-l",
        text_config=None,
        audio_config=None,
        text_embed_dim=None,
        audio_embed_dim=None,
        audio_feature_dim=None,
        audio_feature_layers=None,
        standardize_speech_layers=False,
        speech_layer_combination="weighted_sum",
        stage=None,
        causal=False,
        experts=None,
        text_pooling=None,
        text_layer_norm=None,
        attentive_pooling_hidden_size=None,
        utterance_embed_dim="default",
        utterance_embed_before_activation=None,
        text_head_dropout=None,
        speech_head_hidden_sizes=None,
        speech_head_activation="default",
        speech_head_dropout=None,
        speech_head_input_dropout=0.0,
        context_num_layers=None,
        context_text_hidden_size=None,
        context_audio_hidden_size=None,
        context_dropout=None,
        context_conv_channels=1024,
        context_conv_kernel_sizes=(1, 3, 5),
        fusion_hidden_size=1024,
        fusion_num_blocks=4,
        fusion_attention_size=120,
        fusion_num_heads=3,
        fusion_attention_dropout=0.1,
        fusion_dropout=0.5,
        fusion_layer_norm_eps=1e-6,
        fusion_head_hidden_size=None,
        fusion_input_skip=None,
        fusion_attention_inner_projections=False,
        gate_hidden_size=10,
        gate_temperature=2.0,
        gate_mode="learned",
        classification_loss=None,
        focal_gamma=3.0,
        utterance_focal_gamma=2.0,
        supcon_weight=2.0,
        supcon_temperature=1.0,
        kl_weight=0.1,
        kl_reduction="batchmean",
        joint_context_losses=False,
        initializer_range=0.02,
        conversation_init="pytorch",
        recurrence="auto",
        id2label=None,
        label2id=None,
        **kwargs,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {architecture!r}; valid ones are {', '.join(ARCHITECTURES)}.")
        defaults = _ARCHITECTURE_DEFAULTS[architecture]

        def pick(value, name, unset=None):
            return defaults[name] if value is unset else value

        self.architecture = architecture
        self.text_config = _as_backbone_config(text_config, "text_config")
        self.audio_config = _as_backbone_config(audio_config, "audio_config")
        self.causal = bool(causal)

        # ---- text utterance encoder -------------------------------------------------------------------------
        self.text_pooling = pick(text_pooling, "text_pooling")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"Unknown text_pooling {self.text_pooling!r}; valid ones are {', '.join(TEXT_POOLINGS)}.")
        self.text_layer_norm = bool(pick(text_layer_norm, "text_layer_norm"))
        self.attentive_pooling_hidden_size = (
            None if attentive_pooling_hidden_size is None else int(attentive_pooling_hidden_size)
        )
        self.utterance_embed_dim = pick(utterance_embed_dim, "utterance_embed_dim", unset="default")
        if utterance_embed_before_activation is None and "transformers_version" in kwargs:
            # a config.json saved before this key existed: its context/MoE weights were trained on the activated
            # embeddings, so keep exporting those (a new config takes the architecture's paper default)
            utterance_embed_before_activation = False
        self.utterance_embed_before_activation = bool(
            pick(utterance_embed_before_activation, "utterance_embed_before_activation")
        )
        self.text_head_dropout = float(pick(text_head_dropout, "text_head_dropout"))

        # ---- speech utterance encoder (head) ---------------------------------------------------------------
        self.audio_feature_dim = audio_feature_dim
        self.audio_feature_layers = audio_feature_layers
        self.standardize_speech_layers = bool(standardize_speech_layers)
        if speech_layer_combination not in ("weighted_sum", "concat"):
            raise ValueError(f"`speech_layer_combination` must be 'weighted_sum' or 'concat', got {speech_layer_combination!r}.")
        self.speech_layer_combination = speech_layer_combination
        self.speech_head_hidden_sizes = [int(h) for h in pick(speech_head_hidden_sizes, "speech_head_hidden_sizes")]
        self.speech_head_activation = pick(speech_head_activation, "speech_head_activation", unset="default")
        if self.speech_head_activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown speech_head_activation {self.speech_head_activation!r}; valid ones are {ACTIVATIONS}."
            )
        self.speech_head_dropout = float(pick(speech_head_dropout, "speech_head_dropout"))
        self.speech_head_input_dropout = float(speech_head_input_dropout)
        if not 0.0 <= self.speech_head_input_dropout < 1.0:
            raise ValueError(f"`speech_head_input_dropout` must be in [0, 1), got {self.speech_head_input_dropout}.")

        # ---- context encoders -------------------------------------------------------------------------------
        self.context_num_layers = int(pick(context_num_layers, "context_num_layers"))
        self.context_text_hidden_size = int(pick(context_text_hidden_size, "context_text_hidden_size"))
        self.context_audio_hidden_size = int(pick(context_audio_hidden_size, "context_audio_hidden_size"))
        self.context_dropout = float(pick(context_dropout, "context_dropout"))
        self.context_conv_channels = int(context_conv_channels)
        self.context_conv_kernel_sizes = [int(k) for k in context_conv_kernel_sizes]
        if any(k < 1 or k % 2 == 0 for k in self.context_conv_kernel_sizes):
            raise ValueError(f"`context_conv_kernel_sizes` must be odd positive sizes, got {self.context_conv_kernel_sizes}.")

        # ---- co-attention fusion ----------------------------------------------------------------------------
        self.fusion_hidden_size = int(fusion_hidden_size)
        self.fusion_num_blocks = int(fusion_num_blocks)
        self.fusion_attention_size = int(fusion_attention_size)
        self.fusion_num_heads = int(fusion_num_heads)
        if self.fusion_attention_size % self.fusion_num_heads != 0:
            raise ValueError(
                f"`fusion_attention_size` ({self.fusion_attention_size}) must be divisible by `fusion_num_heads` "
                f"({self.fusion_num_heads})."
            )
        self.fusion_attention_dropout = float(fusion_attention_dropout)
        self.fusion_dropout = float(fusion_dropout)
        self.fusion_layer_norm_eps = float(fusion_layer_norm_eps)
        self.fusion_head_hidden_size = int(fusion_head_hidden_size or self.fusion_hidden_size)
        self.fusion_input_skip = bool(pick(fusion_input_skip, "fusion_input_skip"))
        self.fusion_attention_inner_projections = bool(fusion_attention_inner_projections)

        # ---- gate -------------------------------------------------------------------------------------------
        self.gate_hidden_size = int(gate_hidden_size)
        self.gate_temperature = float(gate_temperature)
        if self.gate_temperature <= 0:
            raise ValueError(f"`gate_temperature` must be > 0, got {self.gate_temperature}.")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"Unknown gate_mode {gate_mode!r}; valid ones are {', '.join(GATE_MODES)}.")
        self.gate_mode = gate_mode

        # ---- losses -----------------------------------------------------------------------------------------
        self.classification_loss = pick(classification_loss, "classification_loss")
        if self.classification_loss not in CLASSIFICATION_LOSSES:
            raise ValueError(
                f"Unknown classification_loss {self.classification_loss!r}; valid ones are "
                f"{', '.join(CLASSIFICATION_LOSSES)}."
            )
        self.focal_gamma = float(focal_gamma)
        self.utterance_focal_gamma = float(utterance_focal_gamma)
        self.supcon_weight = float(supcon_weight)
        self.supcon_temperature = float(supcon_temperature)
        if self.supcon_temperature <= 0:
            raise ValueError(f"`supcon_temperature` must be > 0, got {self.supcon_temperature}.")
        self.kl_weight = float(kl_weight)
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"Unknown kl_reduction {kl_reduction!r}; valid ones are {', '.join(KL_REDUCTIONS)}.")
        self.kl_reduction = kl_reduction
        self.joint_context_losses = bool(joint_context_losses)
        self.initializer_range = float(initializer_range)
        if conversation_init not in CONVERSATION_INITS:
            raise ValueError(
                f"Unknown conversation_init {conversation_init!r}; valid ones are {', '.join(CONVERSATION_INITS)}."
            )
        self.conversation_init = conversation_init
        if recurrence not in RECURRENCES:
            raise ValueError(f"Unknown recurrence {recurrence!r}; valid ones are {', '.join(RECURRENCES)}.")
        self.recurrence = recurrence

        # ---- modalities and embedding sizes -------------------------------------------------------------------
        self.text_embed_dim = self._resolve_text_embed_dim(text_embed_dim)
        self.audio_embed_dim = self._resolve_audio_embed_dim(audio_embed_dim)
        if self.text_embed_dim is None and self.audio_embed_dim is None:
            raise ValueError(
                "MeritsConfig needs at least one modality: set `text_config` or `text_embed_dim` (text), and/or "
                "`audio_config`, `audio_feature_dim` or `audio_embed_dim` (speech)."
            )

        # ---- experts (mister-e) and stage ---------------------------------------------------------------------
        available = []
        if self.audio_embed_dim is not None:
            available.append("speech")
        if self.text_embed_dim is not None:
            available.append("text")
        if len(available) == 2:
            available.append("cross_modal")
        if architecture == "mister-e":
            experts = list(available) if experts is None else list(experts)
            unknown = [e for e in experts if e not in EXPERTS]
            if unknown:
                raise ValueError(f"Unknown experts {unknown}; valid ones are {', '.join(EXPERTS)}.")
            missing = [e for e in experts if e not in available]
            if missing:
                raise ValueError(
                    f"Experts {missing} need a modality this config does not have (available experts: {available})."
                )
            if not experts:
                raise ValueError("`experts` must name at least one expert.")
            self.experts = [e for e in EXPERTS if e in experts]  # canonical order: speech, text, cross_modal
        else:
            if experts is not None:
                raise ValueError("`experts` only applies to architecture='mister-e'.")
            self.experts = None

        if stage is None:
            if architecture == "mister-e":
                stage = "moe"
            else:
                stage = "fusion" if self.has_text and self.has_audio else "context"
        self.stage = self.check_stage(stage)

        id2label, label2id = _resolve_labels(id2label, label2id, kwargs.pop("num_labels", None))
        if id2label is None:
            id2label, label2id = _resolve_labels(None, None, 2)
        super().__init__(id2label=id2label, label2id=label2id, **kwargs)
        self.label2id = label2id

    # ------------------------------------------------------------------------------------------------------
    @property
    def has_text(self):
        return self.text_embed_dim is not None

    @property
    def has_audio(self):
        return self.audio_embed_dim is not None

    def check_stage(self, stage):
        """Validate a stage name for this config and return it."""
        valid = STAGES[self.architecture]
        if stage not in valid:
            raise ValueError(
                f"Unknown stage {stage!r} for architecture {self.architecture!r}; valid ones are {', '.join(valid)}."
            )
        if stage in ("fusion", "context+fusion") and not (self.has_text and self.has_audio):
            raise ValueError(f"Stage {stage!r} fuses speech and text: it needs both modalities configured.")
        return stage

    def _resolve_text_embed_dim(self, text_embed_dim):
        if self.text_config is None:
            return None if text_embed_dim is None else int(text_embed_dim)
        hidden = _backbone_hidden_size(self.text_config)
        if self.utterance_embed_dim is not None:
            derived = int(self.utterance_embed_dim)
        elif self.text_pooling == "attentive_stats":
            derived = 2 * hidden
        else:
            derived = hidden
        if text_embed_dim is not None and int(text_embed_dim) != derived:
            raise ValueError(
                f"text_embed_dim={text_embed_dim} conflicts with the text encoder, whose utterance embeddings are "
                f"{derived}-d (backbone hidden size {hidden}, pooling {self.text_pooling!r}, utterance_embed_dim="
                f"{self.utterance_embed_dim}). Leave text_embed_dim unset when text_config is given."
            )
        return derived

    def _resolve_audio_embed_dim(self, audio_embed_dim):
        if self.audio_config is not None and self.audio_feature_dim is not None:
            raise ValueError(
                "Set either `audio_config` (a speech backbone) or `audio_feature_dim` (precomputed speech features), "
                "not both."
            )
        if self.audio_feature_layers is not None:
            if self.audio_feature_dim is None:
                raise ValueError("`audio_feature_layers` needs `audio_feature_dim` (the size F of [K, F] stacks).")
            self.audio_feature_layers = int(self.audio_feature_layers)
            if self.audio_feature_layers < 1:
                raise ValueError(f"`audio_feature_layers` must be >= 1, got {self.audio_feature_layers}.")
        if self.audio_feature_dim is not None:
            self.audio_feature_dim = int(self.audio_feature_dim)
        if self.standardize_speech_layers and self.audio_config is None and self.audio_feature_layers is None:
            raise ValueError("`standardize_speech_layers` needs a speech backbone (`audio_config`) or layer stacks "
                             "(`audio_feature_layers`).")
        if self.audio_config is None and self.audio_feature_dim is None:
            return None if audio_embed_dim is None else int(audio_embed_dim)
        derived = self.speech_head_hidden_sizes[-1] if self.speech_head_hidden_sizes else self.speech_head_input_size()
        if audio_embed_dim is not None and int(audio_embed_dim) != derived:
            raise ValueError(
                f"audio_embed_dim={audio_embed_dim} conflicts with the speech head, whose utterance embeddings are "
                f"{derived}-d (speech_head_hidden_sizes={self.speech_head_hidden_sizes}). Leave audio_embed_dim unset "
                "when audio_config or audio_feature_dim is given."
            )
        return derived

    def speech_head_input_size(self) -> int:
        """Width of the vector the speech head reads: the backbone's (or `audio_feature_dim`), times the number of
        layers with `speech_layer_combination="concat"`."""
        if self.audio_config is not None:
            width, layers = _backbone_hidden_size(self.audio_config), speech_backbone_layers(self.audio_config)
        else:
            width, layers = self.audio_feature_dim, self.audio_feature_layers
        return width * layers if layers is not None and self.speech_layer_combination == "concat" else width

    def to_dict(self):
        output = super().to_dict()
        # sub-configs are serialised as plain dicts (with `model_type`) and rebuilt by `__init__`
        for key in ("text_config", "audio_config"):
            value = getattr(self, key, None)
            if isinstance(value, PretrainedConfig):
                output[key] = value.to_dict()
                output[key].pop("transformers_version", None)
        return output


__all__ = ["MeritsConfig"]
