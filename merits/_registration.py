# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""Registers the merits classes with transformers, once per process (imported by ``merits.__getattr__``, by
:mod:`merits.hub` and by the command lines; ``merits.register()`` is the public spelling):

- `AutoConfig` (model type ``"merits"``), `AutoModel`, `AutoFeatureExtractor` and `AutoProcessor`, so that the Auto
  classes load merits folders in this process;
- ``register_for_auto_class`` on the config, model, processor and acoustic feature extractor, so that
  ``save_pretrained`` writes ``auto_map`` and copies the remote-code files next to the weights;
- the pipeline task ``"conversation-emotion-recognition"`` in transformers' ``PIPELINE_REGISTRY``.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_merits import MeritsConfig
from .feature_extraction_merits import MeritsAcousticFeatureExtractor
from .modeling_merits import MeritsForConversationClassification
from .pipeline_merits import ConversationEmotionRecognitionPipeline
from .processing_merits import MeritsProcessor


PIPELINE_TASK = "conversation-emotion-recognition"

# In-process Auto classes.
AutoConfig.register(MeritsConfig.model_type, MeritsConfig, exist_ok=True)
AutoModel.register(MeritsConfig, MeritsForConversationClassification, exist_ok=True)
AutoFeatureExtractor.register(MeritsConfig, MeritsAcousticFeatureExtractor, exist_ok=True)
AutoProcessor.register(MeritsConfig, MeritsProcessor, exist_ok=True)

# Remote code: `save_pretrained` writes `auto_map` entries and copies the defining files.
MeritsConfig.register_for_auto_class("AutoConfig")
MeritsForConversationClassification.register_for_auto_class("AutoModel")
MeritsAcousticFeatureExtractor.register_for_auto_class("AutoFeatureExtractor")
MeritsProcessor.register_for_auto_class("AutoProcessor")

# The pipeline task; `merits.hub.save_hub_folder` turns this registration into `custom_pipelines` in config.json.
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK,
    pipeline_class=ConversationEmotionRecognitionPipeline,
    pt_model=AutoModel,
    type="multimodal",
)
