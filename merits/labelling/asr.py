"""Whisper transcripts (openai-whisper, no ffmpeg): audio is decoded with soundfile + soxr at 16 kHz.

MERITS-L transcribes its pre-training speech with ``whisper-large-v3`` (papers.md §3.2), the default
here. Clips of at most 30 s are transcribed in batches with ``whisper.decode`` on a stacked log-mel
batch (greedy, temperature 0); longer clips go one at a time through ``model.transcribe``, which
windows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SAMPLING_RATE = 16000
#: Whisper's window: 30 s of 16 kHz audio.
WINDOW_SAMPLES = 30 * SAMPLING_RATE


def normalise_words(text: str) -> list[str]:
    """Lower-cased words without punctuation (apostrophes inside words kept): the WER tokenisation."""
    import re

    return re.findall(r"[\w]+(?:'[\w]+)*", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, on :func:`normalise_words` tokens."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    if not ref:
        raise ValueError("empty reference transcript")
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, start=1):
        current = [i] + [0] * len(hyp)
        for j, other in enumerate(hyp, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other))
        previous = current
    return previous[-1] / len(ref)


class ASRError(RuntimeError):
    """Whisper cannot be loaded or run; the message says which model or file."""


def load_whisper(name_or_path: str, device: str = "cpu"):
    """``whisper.load_model`` for a released name (``large-v3``, ``tiny`` ...) or a local checkpoint file.

    A local file is a ``torch.save`` of ``{"dims": ModelDimensions as dict, "model_state_dict": ...}``.
    Released names download on first use into ``~/.cache/whisper``; without network only cached or
    local checkpoints load.
    """
    import whisper

    is_file = os.path.isfile(name_or_path)
    if not is_file and name_or_path not in whisper.available_models():
        raise ASRError(
            f"whisper model {name_or_path!r} is neither a file nor one of {', '.join(whisper.available_models())}"
        )
    try:
        return whisper.load_model(name_or_path, device=device)
    except Exception as error:
        hint = "" if is_file else " (no network? pass a local checkpoint path with --whisper-model)"
        raise ASRError(f"cannot load whisper model {name_or_path!r}: {error}{hint}") from error


@dataclass
class Transcript:
    text: str
    language: str | None


class WhisperTranscriber:
    """Transcribes 16 kHz mono float32 arrays with a loaded Whisper model.

    Args:
        model: a ``whisper.model.Whisper`` (see :func:`load_whisper`).
        language: a language code (``"en"``) or ``None`` to detect it per clip.
        batch_size: clips of at most 30 s decoded together.
        sample_len: maximum tokens per clip (``None`` = Whisper's default, half its text context).
    """

    def __init__(self, model, language: str | None = None, batch_size: int = 8, sample_len: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.language = language
        self.batch_size = batch_size
        self.sample_len = sample_len

    def _options(self):
        import whisper

        return whisper.DecodingOptions(
            task="transcribe",
            language=self.language,
            temperature=0.0,
            fp16=self.model.device.type == "cuda",  # half-precision decoding on a GPU (openai-whisper's default there)
            without_timestamps=True,
            sample_len=self.sample_len,
        )

    def _decode_batch(self, arrays: Sequence[np.ndarray]) -> list[Transcript]:
        import torch
        import whisper

        mels = [
            whisper.log_mel_spectrogram(
                whisper.pad_or_trim(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))),
                n_mels=self.model.dims.n_mels,
            )
            for array in arrays
        ]
        mel = torch.stack(mels).to(self.model.device)
        with torch.inference_mode():
            results = whisper.decode(self.model, mel, self._options())
        return [Transcript(text=result.text.strip(), language=result.language) for result in results]

    def _transcribe_long(self, array: np.ndarray) -> Transcript:
        options = {"language": self.language, "fp16": self.model.device.type == "cuda", "temperature": 0.0, "verbose": None}
        if self.sample_len is not None:
            options["sample_len"] = self.sample_len
        result = self.model.transcribe(np.ascontiguousarray(array, dtype=np.float32), **options)
        return Transcript(text=result["text"].strip(), language=result.get("language"))

    def transcribe(self, arrays: Sequence[np.ndarray]) -> list[Transcript]:
        """Transcripts in the order of ``arrays``; clips <= 30 s are batched, longer ones windowed."""
        transcripts: list[Transcript | None] = [None] * len(arrays)
        short = [i for i, array in enumerate(arrays) if len(array) <= WINDOW_SAMPLES]
        for start in range(0, len(short), self.batch_size):
            indices = short[start : start + self.batch_size]
            for index, transcript in zip(indices, self._decode_batch([arrays[i] for i in indices])):
                transcripts[index] = transcript
        for index, array in enumerate(arrays):
            if transcripts[index] is None:
                transcripts[index] = self._transcribe_long(array)
        return transcripts  # type: ignore[return-value]
