# Copyright 2025 The merits authors. Licensed under the Apache License, Version 2.0.
"""merits: MERITS-L and MiSTER-E speech + text emotion recognition in conversations, as Hugging Face Hub models.

```python
from merits import MeritsConfig, MeritsForConversationClassification, MeritsProcessor

model = MeritsForConversationClassification(MeritsConfig(architecture="mister-e", text_embed_dim=..., ...))
```

The public names load lazily (as transformers' own do): ``import merits`` and the command lines' ``--help`` import
neither torch nor transformers. The first use of a public name (``from merits import MeritsConfig``,
``merits.MeritsProcessor``) imports the model code and registers it with transformers (:mod:`merits._registration`):

- `AutoConfig` (model type ``"merits"``), `AutoModel`, `AutoFeatureExtractor` and `AutoProcessor`, so that the Auto
  classes load merits folders in this process;
- ``register_for_auto_class`` on the config, model, processor and acoustic feature extractor, so that
  ``save_pretrained`` writes ``auto_map`` and copies the remote-code files next to the weights;
- the pipeline task ``"conversation-emotion-recognition"`` in transformers' ``PIPELINE_REGISTRY``.

``merits.register()`` does the registration alone (e.g. before ``AutoModel.from_pretrained(folder)`` without
``trust_remote_code`` in a process that has used no merits name yet).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "ConversationEmotionRecognitionPipeline": ".pipeline_merits",
    "MeritsAcousticFeatureExtractor": ".feature_extraction_merits",
    "MeritsConfig": ".configuration_merits",
    "MeritsConversationClassifierOutput": ".modeling_merits",
    "MeritsForConversationClassification": ".modeling_merits",
    "MeritsPreTrainedModel": ".modeling_merits",
    "MeritsProcessor": ".processing_merits",
    "PIPELINE_TASK": ".hub",
    "load_hub_folder": ".hub",
    "save_hub_folder": ".hub",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as eager imports
    from .configuration_merits import MeritsConfig
    from .feature_extraction_merits import MeritsAcousticFeatureExtractor
    from .hub import PIPELINE_TASK, load_hub_folder, save_hub_folder
    from .modeling_merits import (
        MeritsConversationClassifierOutput,
        MeritsForConversationClassification,
        MeritsPreTrainedModel,
    )
    from .pipeline_merits import ConversationEmotionRecognitionPipeline
    from .processing_merits import MeritsProcessor


def register() -> None:
    """Register the merits classes with transformers' Auto classes and pipeline registry (idempotent)."""
    importlib.import_module("._registration", __name__)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        register()
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted([*_EXPORTS, "register"])
