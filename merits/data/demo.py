"""The built-in demo corpus: synthetic speech+text conversations from an explicit hidden Markov model.

No downloads; :func:`make_demo_corpus` builds ~200 conversations in a few seconds, deterministically
from its seed. It exists so that the whole pipeline (Stage I/II/III, the MiSTER-E experts and gate)
trains on 2 CPU cores and shows the effects the papers rely on:

* **context helps**: emotions persist across turns (a Markov chain), so neighbouring turns carry
  evidence about the current one;
* **fusion helps**: text and audio are emitted independently given the emotion, and each modality
  alone is noisy (ambiguous wording, ambiguous prosody).

Generative model (all constants are module-level and documented below):

1. Each conversation has ``6-14`` turns. Emotions ``neutral, happy, sad, angry`` follow a Markov
   chain (:data:`INITIAL`, :data:`TRANSITION`): a turn keeps the previous emotion with probability
   0.75-0.8 and otherwise drifts, mostly back to neutral.
2. **Text**: each turn draws a *cue* (:data:`TEXT_CUE_PROBS`): with probability 0.55 a cue phrase of its
   own emotion, 0.12 a phrase of another emotion (sarcasm, misleading wording), 0.33 none (a
   neutral-worded sentence about a topic). The sentence is a random template filled with a topic and
   the cue phrase; topic words never overlap cue words, so the cue is recoverable from the text.
3. **Audio**: each turn draws prosody ``(log2 F0, energy dB, syllable rate)`` from a Gaussian per
   emotion (:data:`PROSODY_MEAN`, :data:`PROSODY_STD`), or, with probability
   :data:`AUDIO_AMBIGUOUS_PROB`, from one broad emotion-independent Gaussian. The waveform (0.5-1.5 s
   at 16 kHz) is a voiced harmonic source at that F0 (with a slow random drift and vibrato), shaped
   into syllables at that rate, scaled to that energy, plus breath noise and a noise floor.

Because the emission model is known, :func:`bayes_optimal_accuracy` runs forward-backward with the
true parameters on the latent emissions (stored in the ``latent_*`` columns, for analysis only, never
a model input): an upper bound on what any model of the text and waveform can reach.
"""

from __future__ import annotations

import datasets
import numpy as np
import scipy.signal

from .schema import audio_value, conversation_features, dataset_from_columns

EMOTIONS = ("neutral", "happy", "sad", "angry")
SAMPLING_RATE = 16000

#: Initial emotion distribution of a conversation.
INITIAL = np.array([0.40, 0.20, 0.20, 0.20])
#: TRANSITION[i, j] = P(emotion j at turn t+1 | emotion i at turn t).
TRANSITION = np.array(
    [
        [0.80, 0.0667, 0.0667, 0.0666],  # neutral: stays, or moves to any emotion
        [0.15, 0.75, 0.05, 0.05],  # happy: stays, or mostly calms down to neutral
        [0.15, 0.05, 0.75, 0.05],
        [0.15, 0.05, 0.05, 0.75],
    ]
)
#: P(cue of the true emotion), P(cue of one specific other emotion), P(no cue).
TEXT_CUE_PROBS = (0.55, 0.04, 0.33)

CUE_PHRASES = {
    "neutral": ["okay", "noted", "alright then", "understood", "sure thing", "fair enough"],
    "happy": ["this is great", "wonderful", "i love it", "fantastic news", "i am so glad", "awesome"],
    "sad": ["i am so sorry", "that is heartbreaking", "i miss them", "i feel lonely", "so depressing", "what a loss"],
    "angry": ["this is ridiculous", "i am furious", "i hate this", "unacceptable", "stop it now", "so annoying"],
}
TOPICS = [
    "the meeting tomorrow", "the train schedule", "dinner tonight", "the new apartment", "my sister",
    "the project report", "the weekend trip", "the phone bill", "your old car", "the garden",
    "the interview", "our neighbours", "the kitchen sink", "the football match", "the exam results",
    "the bank account", "the birthday party", "the hospital visit", "the coffee machine", "the flight",
]
NEUTRAL_SENTENCES = [
    "tell me about {topic}", "we talked about {topic} earlier", "what time is {topic}",
    "i need to check {topic}", "did you hear about {topic}", "let us discuss {topic}",
    "can you remind me about {topic}", "i was thinking about {topic}",
]
CUE_TEMPLATES = [
    "{cue} , {topic}", "{topic} ? {cue}", "about {topic} , {cue}", "{cue} . it is {topic}",
    "you know , {topic} , {cue}", "{cue}",
]

#: Prosody per emotion: (log2 F0 in Hz, energy in dB re full scale, syllables per second).
PROSODY_MEAN = {
    "neutral": (np.log2(135.0), -26.0, 4.0),
    "happy": (np.log2(200.0), -20.0, 5.4),
    "sad": (np.log2(110.0), -32.0, 2.9),
    "angry": (np.log2(165.0), -15.0, 5.0),
}
PROSODY_STD = np.array([0.36, 5.5, 1.1])
#: Probability that a turn's prosody ignores its emotion, and that emotion-independent Gaussian.
AUDIO_AMBIGUOUS_PROB = 0.30
AMBIGUOUS_MEAN = np.array([np.log2(150.0), -23.0, 4.3])
AMBIGUOUS_STD = np.array([0.40, 6.0, 1.2])

SPLIT_FRACTIONS = {"train": 0.70, "validation": 0.15, "test": 0.15}
LATENT_COLUMNS = ("latent_text_cue", "latent_audio_ambiguous", "latent_log2_f0", "latent_energy_db", "latent_rate_hz")


def _sample_emotions(rng: np.random.Generator, num_turns: int) -> np.ndarray:
    states = np.empty(num_turns, dtype=np.int64)
    states[0] = rng.choice(len(EMOTIONS), p=INITIAL)
    for t in range(1, num_turns):
        states[t] = rng.choice(len(EMOTIONS), p=TRANSITION[states[t - 1]])
    return states


def _text_cue_distribution(emotion: int) -> np.ndarray:
    """P(cue) over [neutral, happy, sad, angry, none] for a turn of ``emotion``."""
    own, other, none = TEXT_CUE_PROBS
    probs = np.full(len(EMOTIONS) + 1, other)
    probs[emotion] = own
    probs[-1] = none
    return probs / probs.sum()


def _sample_text(rng: np.random.Generator, emotion: int) -> tuple[str, str]:
    cue = int(rng.choice(len(EMOTIONS) + 1, p=_text_cue_distribution(emotion)))
    topic = TOPICS[rng.integers(len(TOPICS))]
    if cue == len(EMOTIONS):
        text = NEUTRAL_SENTENCES[rng.integers(len(NEUTRAL_SENTENCES))].format(topic=topic)
        return text, "none"
    phrases = CUE_PHRASES[EMOTIONS[cue]]
    template = CUE_TEMPLATES[rng.integers(len(CUE_TEMPLATES))]
    return template.format(cue=phrases[rng.integers(len(phrases))], topic=topic), EMOTIONS[cue]


def _sample_prosody(rng: np.random.Generator, emotion: int) -> tuple[bool, np.ndarray]:
    if rng.random() < AUDIO_AMBIGUOUS_PROB:
        return True, AMBIGUOUS_MEAN + AMBIGUOUS_STD * rng.standard_normal(3)
    return False, np.asarray(PROSODY_MEAN[EMOTIONS[emotion]]) + PROSODY_STD * rng.standard_normal(3)


def synthesize_utterance(rng: np.random.Generator, log2_f0: float, energy_db: float, rate_hz: float) -> np.ndarray:
    """A 0.5-1.5 s voiced utterance at 16 kHz with the given pitch, energy and syllable rate."""
    sr = SAMPLING_RATE
    duration = rng.uniform(0.5, 1.5)
    n = int(duration * sr)
    t = np.arange(n) / sr
    f0 = 2.0**log2_f0
    f0 = np.clip(f0, 60.0, 450.0)
    # slow drift (declination or rise) + 5 Hz vibrato, both emotion-independent
    contour = f0 * 2.0 ** ((rng.normal(0, 2.0) * t / max(duration, 1e-3) + 0.2 * np.sin(2 * np.pi * 5.0 * t)) / 12)
    phase = np.cumsum(contour) / sr
    # sawtooth = all harmonics with 1/k amplitudes; a one-pole low-pass tilts the spectrum like a glottal source
    source = 2.0 * (phase - np.floor(phase + 0.5))
    voiced = scipy.signal.lfilter([0.15], [1.0, -0.85], source)
    # syllables: raised-cosine bursts at the syllable rate with jittered lengths and short gaps
    rate = float(np.clip(rate_hz, 1.0, 9.0))
    envelope = np.zeros(n)
    position = int(rng.uniform(0.0, 0.05) * sr)
    while position < n:
        length = max(int(sr / rate * rng.uniform(0.8, 1.2)), 80)
        burst = int(length * 0.8)
        end = min(position + burst, n)
        envelope[position:end] = np.hanning(burst + 2)[1:-1][: end - position] * rng.uniform(0.7, 1.0)
        position += length
    signal = voiced * envelope + 0.02 * rng.standard_normal(n) * envelope  # breath noise
    rms = np.sqrt(np.mean(signal[envelope > 0.1] ** 2) + 1e-12)
    signal *= 10.0 ** (energy_db / 20.0) / rms
    signal += 10.0 ** (-60 / 20) * rng.standard_normal(n)  # recording noise floor
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def make_demo_corpus(num_dialogues: int = 200, seed: int = 0, with_audio: bool = True) -> datasets.DatasetDict:
    """The demo corpus as a :class:`datasets.DatasetDict` (``train`` / ``validation`` / ``test`` by conversation).

    Args:
        num_dialogues: number of conversations (split 70/15/15).
        seed: everything (emotions, words, waveforms) is a deterministic function of it.
        with_audio: set False for a text-only corpus (``audio`` is None), which builds instantly.

    Columns: the schema of :mod:`merits.data.schema` plus the generator's latent emissions
    (``latent_*``, analysis only, used by :func:`bayes_optimal_accuracy`).
    """
    if num_dialogues < 3:
        raise ValueError(f"make_demo_corpus needs at least 3 dialogues (one per split), got {num_dialogues}")
    rng = np.random.default_rng(seed)
    num_train = int(round(num_dialogues * SPLIT_FRACTIONS["train"]))
    num_validation = max(1, int(round(num_dialogues * SPLIT_FRACTIONS["validation"])))
    num_train = min(num_train, num_dialogues - num_validation - 1)
    boundaries = {"train": (0, num_train), "validation": (num_train, num_train + num_validation),
                  "test": (num_train + num_validation, num_dialogues)}
    features = conversation_features(
        EMOTIONS,
        extra={
            "latent_text_cue": datasets.Value("string"),
            "latent_audio_ambiguous": datasets.Value("bool"),
            "latent_log2_f0": datasets.Value("float32"),
            "latent_energy_db": datasets.Value("float32"),
            "latent_rate_hz": datasets.Value("float32"),
        },
    )
    corpus = datasets.DatasetDict()
    for split, (first, last) in boundaries.items():
        columns = {name: [] for name in features}
        for dialogue in range(first, last):
            num_turns = int(rng.integers(6, 15))
            for turn, emotion in enumerate(_sample_emotions(rng, num_turns)):
                text, cue = _sample_text(rng, int(emotion))
                ambiguous, prosody = _sample_prosody(rng, int(emotion))
                audio = None
                if with_audio:
                    audio = audio_value(array=synthesize_utterance(rng, *prosody), sampling_rate=SAMPLING_RATE)
                columns["dialogue_id"].append(f"demo_{dialogue:04d}")
                columns["turn"].append(turn)
                columns["text"].append(text)
                columns["audio"].append(audio)
                columns["label"].append(int(emotion))
                columns["latent_text_cue"].append(cue)
                columns["latent_audio_ambiguous"].append(bool(ambiguous))
                columns["latent_log2_f0"].append(float(prosody[0]))
                columns["latent_energy_db"].append(float(prosody[1]))
                columns["latent_rate_hz"].append(float(prosody[2]))
        corpus[split] = dataset_from_columns(columns, features)
    return corpus


# -- the best achievable accuracy ------------------------------------------------------------------------


def _emission_likelihoods(split: datasets.Dataset, modality: str) -> np.ndarray:
    """[N, 4] likelihood of each row's latent emissions under each emotion (true generative parameters)."""
    columns = split.select_columns(list(LATENT_COLUMNS))[:]
    likelihood = np.ones((len(split), len(EMOTIONS)))
    if modality in ("text", "both"):
        cue_index = np.array([len(EMOTIONS) if c == "none" else EMOTIONS.index(c) for c in columns["latent_text_cue"]])
        table = np.stack([_text_cue_distribution(e) for e in range(len(EMOTIONS))], axis=1)  # [5 cues, 4 emotions]
        likelihood *= table[cue_index]
    if modality in ("audio", "both"):
        x = np.stack([columns["latent_log2_f0"], columns["latent_energy_db"], columns["latent_rate_hz"]], axis=1)

        def gaussian(mean, std):
            return np.exp(-0.5 * np.sum(((x - mean) / std) ** 2, axis=1)) / np.prod(std)

        ambiguous = gaussian(AMBIGUOUS_MEAN, AMBIGUOUS_STD)
        audio = np.stack(
            [(1 - AUDIO_AMBIGUOUS_PROB) * gaussian(np.asarray(PROSODY_MEAN[e]), PROSODY_STD) + AUDIO_AMBIGUOUS_PROB * ambiguous
             for e in EMOTIONS],
            axis=1,
        )
        likelihood *= audio
    return likelihood


def _stationary() -> np.ndarray:
    values, vectors = np.linalg.eig(TRANSITION.T)
    vector = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    return vector / vector.sum()


def posterior_marginals(split: datasets.Dataset, modality: str = "both", context: bool = True) -> np.ndarray:
    """[N, 4] P(emotion of each turn | evidence) under the true model, rows in the split's order.

    ``context=True`` runs forward-backward over each conversation; ``context=False`` uses each turn
    alone with the marginal prior of its position in the chain.
    """
    if modality not in ("text", "audio", "both"):
        raise ValueError(f"modality must be 'text', 'audio' or 'both', got {modality!r}")
    missing = [c for c in LATENT_COLUMNS if c not in split.column_names]
    if missing:
        raise ValueError(f"bayes_optimal_accuracy needs a split of make_demo_corpus (missing columns {missing})")
    likelihood = _emission_likelihoods(split, modality)
    dialogue_ids = split["dialogue_id"]
    turns = np.asarray(split["turn"])
    groups: dict[str, list[int]] = {}
    for index, dialogue in enumerate(dialogue_ids):
        groups.setdefault(dialogue, []).append(index)
    posterior = np.zeros_like(likelihood)
    for indices in groups.values():
        indices = sorted(indices, key=lambda i: turns[i])
        emission = likelihood[indices]
        if not context:
            prior = INITIAL.copy()
            priors = []
            for _ in indices:
                priors.append(prior)
                prior = prior @ TRANSITION
            joint = np.asarray(priors) * emission
            posterior[indices] = joint / joint.sum(axis=1, keepdims=True)
            continue
        num_turns = len(indices)
        forward = np.zeros((num_turns, len(EMOTIONS)))
        backward = np.ones((num_turns, len(EMOTIONS)))
        alpha = INITIAL * emission[0]
        forward[0] = alpha / alpha.sum()
        for t in range(1, num_turns):
            alpha = (forward[t - 1] @ TRANSITION) * emission[t]
            forward[t] = alpha / alpha.sum()
        for t in range(num_turns - 2, -1, -1):
            beta = TRANSITION @ (emission[t + 1] * backward[t + 1])
            backward[t] = beta / beta.sum()
        joint = forward * backward
        posterior[indices] = joint / joint.sum(axis=1, keepdims=True)
    return posterior


def bayes_optimal_accuracy(split: datasets.Dataset, modality: str = "both", context: bool = True) -> float:
    """Accuracy of the Bayes-optimal decoder that knows the true generative model.

    It decodes each turn with the argmax of :func:`posterior_marginals` computed from the latent
    emissions (cue phrase, prosody). Text and waveforms are functions of those latents plus
    emotion-independent noise, so no model of the observable data can beat it (in expectation).
    """
    predictions = posterior_marginals(split, modality=modality, context=context).argmax(axis=1)
    return float(np.mean(predictions == np.asarray(split["label"])))


def bayes_optimal_table(split: datasets.Dataset) -> dict[str, float]:
    """:func:`bayes_optimal_accuracy` for every modality, with and without context."""
    return {
        f"{'context' if context else 'utterance'}_{modality}": bayes_optimal_accuracy(split, modality, context)
        for context in (False, True)
        for modality in ("text", "audio", "both")
    }


# -- tokenizer --------------------------------------------------------------------------------------------


def train_demo_tokenizer(dataset, vocab_size: int = 1000, model: str = "wordlevel"):
    """A :class:`~transformers.PreTrainedTokenizerFast` trained on the ``train`` text of ``dataset``.

    ``dataset`` is a :class:`datasets.DatasetDict` (its ``train`` split is used) or a
    :class:`datasets.Dataset`. ``model`` is ``"wordlevel"`` or ``"bpe"``. Specials: ``[PAD]`` (id 0),
    ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``; single sentences are wrapped as ``[CLS] ... [SEP]``.
    The result is ``save_pretrained``-able and loads back with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    split = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    texts = [text for text in split["text"] if text]
    if not texts:
        raise ValueError("train_demo_tokenizer: the training split has no text")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if model == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        raise ValueError(f"model must be 'wordlevel' or 'bpe', got {model!r}")
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )
