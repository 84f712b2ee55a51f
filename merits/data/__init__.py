"""Conversations as datasets: corpus loaders, the demo corpus, audio decoding, collators and the embedding cache.

Every loader returns a :class:`datasets.DatasetDict` of utterance rows in the schema of
:mod:`merits.data.schema` (``dialogue_id``, ``turn``, ``text``, ``audio``, ``label`` + analysis
columns). Nothing is downloaded: loaders read local copies in the corpora's official layouts.

==========================  ===============================================================
function                    corpus
==========================  ===============================================================
:func:`load_iemocap`        IEMOCAP released tree (4- or 6-class, MERITS-L / MiSTER-E splits)
:func:`load_meld`           MELD official CSVs (7 emotions or 3 sentiments), optional wavs
:func:`load_mosi`           CMU-MOSI label CSV (binary), optional SDK-layout wavs
:func:`load_msp_podcast`    MSP-Podcast labels + audio (+ transcripts), valence oracle labels
:func:`load_folder`         any labels CSV + audio folder
:func:`load_emodb`          EmoDB (a folder corpus); see :func:`leave_speaker_out_folds`
:func:`make_demo_corpus`    the built-in synthetic HMM corpus (no downloads)
==========================  ===============================================================
"""

from .audio import AudioError, load_audio
from .cache import build_embedding_cache, embedding_cache_fingerprint
from .corpora import SCORING_CORPORA, SplitError, load_labelled_corpus, select_split
from .collate import (
    ConversationCollator,
    ConversationDataset,
    FeatureCollator,
    RandomAudioCrop,
    conversation_indices,
    conversations,
)
from .demo import bayes_optimal_accuracy, bayes_optimal_table, make_demo_corpus, train_demo_tokenizer
from .folder import leave_speaker_out_folds, load_emodb, load_folder
from .iemocap import load_iemocap
from .meld import load_meld
from .mosi import load_mosi
from .msp_podcast import load_msp_podcast
from .schema import DataFormatError, LoadReport, conversation_features

__all__ = [
    "AudioError",
    "SCORING_CORPORA",
    "SplitError",
    "select_split",
    "load_labelled_corpus",
    "ConversationCollator",
    "ConversationDataset",
    "DataFormatError",
    "FeatureCollator",
    "RandomAudioCrop",
    "LoadReport",
    "bayes_optimal_accuracy",
    "bayes_optimal_table",
    "build_embedding_cache",
    "conversation_features",
    "conversation_indices",
    "conversations",
    "embedding_cache_fingerprint",
    "leave_speaker_out_folds",
    "load_audio",
    "load_emodb",
    "load_folder",
    "load_iemocap",
    "load_meld",
    "load_mosi",
    "load_msp_podcast",
    "make_demo_corpus",
    "train_demo_tokenizer",
]
