"""Hub compatibility: `merits.save_hub_folder` writes a complete model repo folder that loads

- in this process with `merits.load_hub_folder` (identical outputs), and
- with `AutoConfig` / `AutoModel` / `AutoProcessor` / `pipeline(..., trust_remote_code=True)` in a FRESH python
  process where the `merits` package cannot be imported (identical outputs), from the folder itself and from an
  offline HF cache laid out exactly as huggingface_hub lays it out.

Tiny random configs (tests/_tiny.py), a tokenizer trained here, synthesized audio: no downloads.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import Wav2Vec2FeatureExtractor

from _fresh import HIDE_MERITS
from _tiny import tiny_merits_config, tiny_roberta_config, tiny_wavlm_config
from merits import (
    MeritsAcousticFeatureExtractor,
    MeritsConfig,
    MeritsForConversationClassification,
    MeritsProcessor,
    load_hub_folder,
    save_hub_folder,
)
from merits.hub import HUB_CODE_FILES, PIPELINE_TASK, check_hub_code, make_model_card
from test_processing import make_tokenizer, voiced


torch.set_num_threads(1)

REPO_ID = "some-org/some-name"
COMMIT = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"


# ---------------------------------------------------------------------------------------------------------------
# Tiny models of both architectures
# ---------------------------------------------------------------------------------------------------------------


def _raw_conversations():
    return [
        [
            {"text": "hello there how are you", "audio": voiced(0.35, f0=130, seed=1), "sampling_rate": 16000},
            {"text": "i got the job", "audio": None},
            {"text": None, "audio": voiced(0.25, f0=210, seed=2), "sampling_rate": 16000},
        ],
        [{"text": "oh no i am so sorry", "audio": voiced(0.30, f0=170, seed=3), "sampling_rate": 16000}],
    ]


def _embedding_conversations(config, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [3, 2]
    conversations = []
    for length in lengths:
        turns = []
        for t in range(length):
            turn = {"text_embeds": rng.standard_normal(config.text_embed_dim).astype(np.float32).tolist()}
            if t != 1:  # turn 1 has no speech
                turn["audio_embeds"] = rng.standard_normal(config.audio_embed_dim).astype(np.float32).tolist()
            turns.append(turn)
        conversations.append(turns)
    return conversations


def _embedding_batch(config, conversations):
    batch_size, max_turns = len(conversations), max(len(c) for c in conversations)
    batch = {
        "turn_mask": torch.zeros(batch_size, max_turns, dtype=torch.long),
        "text_mask": torch.zeros(batch_size, max_turns, dtype=torch.long),
        "audio_mask": torch.zeros(batch_size, max_turns, dtype=torch.long),
        "text_embeds": torch.zeros(batch_size, max_turns, config.text_embed_dim),
        "audio_embeds": torch.zeros(batch_size, max_turns, config.audio_embed_dim),
    }
    for b, conversation in enumerate(conversations):
        for t, turn in enumerate(conversation):
            batch["turn_mask"][b, t] = 1
            for key, mask in (("text_embeds", "text_mask"), ("audio_embeds", "audio_mask")):
                if key in turn:
                    batch[key][b, t] = torch.tensor(turn[key])
                    batch[mask][b, t] = 1
    return batch


def build_case(kind: str):
    """Returns (model, processor, conversations, model_inputs) for one kind of tiny model."""
    torch.manual_seed(0)
    if kind == "mister-e-backbones":
        config = tiny_merits_config("mister-e", text_config=tiny_roberta_config(), audio_config=tiny_wavlm_config())
        processor = MeritsProcessor(
            tokenizer=make_tokenizer(), feature_extractor=Wav2Vec2FeatureExtractor(), label2id=dict(config.label2id)
        )
    elif kind == "merits-l-acoustic":
        feature_extractor = MeritsAcousticFeatureExtractor()
        feature_extractor.fit([voiced(0.3, f0=f0, seed=i) for i, f0 in enumerate((100, 140, 180, 240))])
        config = tiny_merits_config(
            "merits-l", text_config=tiny_roberta_config(), audio_feature_dim=feature_extractor.feature_size
        )
        processor = MeritsProcessor(
            tokenizer=make_tokenizer(), feature_extractor=feature_extractor, label2id=dict(config.label2id)
        )
    elif kind in ("merits-l-embeddings", "mister-e-embeddings"):
        config = tiny_merits_config(kind.split("-embeddings")[0])
        processor = None
    else:
        raise ValueError(kind)
    model = MeritsForConversationClassification(config).eval()
    if processor is None:
        conversations = _embedding_conversations(config)
        model_inputs = _embedding_batch(config, conversations)
    else:
        conversations = _raw_conversations()
        model_inputs = dict(processor(conversations))
    return model, processor, conversations, model_inputs


def _logits(model, inputs):
    with torch.no_grad():
        output = model(**inputs)
    return output.logits, getattr(output, "gate_weights", None)


# ---------------------------------------------------------------------------------------------------------------
# Folder contents and in-process round trip
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mister-e-backbones", "merits-l-acoustic", "merits-l-embeddings", "mister-e-embeddings"])
def test_hub_folder_contents_and_in_process_round_trip(tmp_path, kind):
    model, processor, conversations, inputs = build_case(kind)
    folder = save_hub_folder(model, processor, tmp_path / "repo")
    names = {path.name for path in folder.iterdir()}

    assert set(HUB_CODE_FILES) <= names
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "merits"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_merits.MeritsConfig",
        "AutoModel": "modeling_merits.MeritsForConversationClassification",
        "AutoProcessor": "processing_merits.MeritsProcessor",
    }
    assert config["custom_pipelines"][PIPELINE_TASK]["impl"] == "pipeline_merits.ConversationEmotionRecognitionPipeline"
    assert config["custom_pipelines"][PIPELINE_TASK]["pt"] == ["AutoModel"]
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_merits.MeritsProcessor"}
    if processor is not None:
        assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    if kind == "merits-l-acoustic":
        feature_config = json.loads((folder / "preprocessor_config.json").read_text())
        assert feature_config["auto_map"] == {
            "AutoFeatureExtractor": "feature_extraction_merits.MeritsAcousticFeatureExtractor"
        }
        assert feature_config["do_normalize"] is True
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "merits" in card.data.tags
    assert check_hub_code(folder) == sorted(HUB_CODE_FILES)

    loaded_model, loaded_processor = load_hub_folder(folder)
    assert isinstance(loaded_model.config, MeritsConfig)
    assert loaded_model.config.architecture == model.config.architecture
    if processor is not None:
        loaded_inputs = dict(loaded_processor(conversations))
        assert sorted(loaded_inputs) == sorted(inputs)
        for key in inputs:
            torch.testing.assert_close(loaded_inputs[key], inputs[key], msg=key)
    expected_logits, expected_gate = _logits(model, inputs)
    logits, gate = _logits(loaded_model, inputs)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    if expected_gate is not None:
        torch.testing.assert_close(gate, expected_gate, rtol=0, atol=1e-6)


def test_model_card_with_results_and_user_card(tmp_path):
    model, processor, _, _ = build_case("merits-l-embeddings")
    card_text = make_model_card(
        model.config, results={"test_weighted_f1": 0.61, "test_accuracy": 0.64, "epoch": 3, "note": "x"}, dataset_name="meld"
    )
    card = ModelCard(card_text)
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"test_weighted_f1": 0.61, "test_accuracy": 0.64, "epoch": 3.0}
    assert {result.dataset_split for result in card.data.eval_results} == {"test", None}
    assert "model-index" in card_text

    folder = save_hub_folder(model, processor, tmp_path / "repo", model_card="# My model\n\nTrained on things.\n")
    written = (folder / "README.md").read_text()
    assert written.startswith("---\n") and written.rstrip().endswith("Trained on things.")
    assert ModelCard.load(folder / "README.md").data.library_name == "transformers"


def test_check_hub_code_rejects_foreign_imports_and_missing_files(tmp_path):
    model, processor, _, _ = build_case("merits-l-embeddings")
    folder = save_hub_folder(model, processor, tmp_path / "repo")
    with open(folder / "pipeline_merits.py", "a", encoding="utf-8") as writer:
        writer.write("\nimport soxr\n")
    with pytest.raises(ValueError, match="pipeline_merits.py imports 'soxr'"):
        check_hub_code(folder)
    (folder / "feature_extraction_merits.py").unlink()
    with pytest.raises(ValueError, match="feature_extraction_merits.py is missing"):
        check_hub_code(folder)


# ---------------------------------------------------------------------------------------------------------------
# A fresh process where `merits` is not importable
# ---------------------------------------------------------------------------------------------------------------

HIDDEN_MERITS_SCRIPT = HIDE_MERITS + textwrap.dedent(
    r"""
    import json

    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline

    source, case_file, result_file = sys.argv[1:4]
    torch.set_num_threads(1)
    case = torch.load(case_file, weights_only=False)
    result = {"merits_hidden": merits_hidden}

    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    result["config_class"] = type(config).__name__
    result["model_type"] = config.model_type
    result["model_class"] = type(model).__name__
    result["model_module"] = type(model).__module__
    result["processor_class"] = type(processor).__name__
    result["feature_extractor_class"] = type(processor.feature_extractor).__name__

    if case["conversations_are_raw"]:
        batch = dict(processor(case["conversations"]))
        result["batch_keys"] = sorted(batch)
        result["batch_max_abs_diff"] = max(
            float((batch[key].double() - case["inputs"][key].double()).abs().max()) for key in case["inputs"]
        )
    else:
        batch = case["inputs"]
    with torch.no_grad():
        output = model(**batch)
    result["logits_max_abs_diff"] = float((output.logits - case["logits"]).abs().max())
    if case["gate"] is not None:
        result["gate_max_abs_diff"] = float((output.gate_weights - case["gate"]).abs().max())

    classifier = pipeline(case["task"], model=source, trust_remote_code=True)
    result["pipeline_class"] = type(classifier).__name__
    result["pipeline"] = classifier(case["conversations"])
    result["merits_modules_loaded"] = sorted(name for name in sys.modules if name.split(".")[0] == "merits")
    with open(result_file, "w") as writer:
        json.dump(result, writer)
    """
)


def run_without_merits(tmp_path: Path, source: str, case: dict, extra_env: dict | None = None) -> dict:
    """Runs HIDDEN_MERITS_SCRIPT in a fresh interpreter (cwd outside the repo, no PYTHONPATH, merits blocked)."""
    work = tmp_path / "fresh_process"
    work.mkdir(exist_ok=True)
    case_file, result_file, script_file = work / "case.pt", work / "result.json", work / "check.py"
    torch.save(case, case_file)
    script_file.write_text(HIDDEN_MERITS_SCRIPT)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(
        {
            "HF_HOME": str(work / "hf_home"),  # fresh remote-code module cache; nothing from earlier runs
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra_env or {})
    completed = subprocess.run(
        [sys.executable, str(script_file), source, str(case_file), str(result_file)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if completed.returncode != 0:
        raise AssertionError(f"fresh process failed ({completed.returncode}):\n{completed.stderr[-6000:]}")
    return json.loads(result_file.read_text())


def _expected_case(model, processor, conversations, inputs):
    logits, gate = _logits(model, inputs)
    return {
        "task": PIPELINE_TASK,
        "conversations": conversations,
        "conversations_are_raw": processor is not None,
        "inputs": {key: value for key, value in inputs.items()},
        "logits": logits,
        "gate": gate,
    }


def _check_fresh_result(result, case, model, processor):
    assert result["merits_hidden"] is True
    assert result["merits_modules_loaded"] == []
    assert result["model_type"] == "merits"
    assert result["config_class"] == "MeritsConfig"
    assert result["model_class"] == "MeritsForConversationClassification"
    assert result["model_module"].startswith("transformers_modules.")  # the remote code, not a local package
    assert result["processor_class"] == "MeritsProcessor"
    if processor is not None:
        assert result["feature_extractor_class"] == type(processor.feature_extractor).__name__
        assert result["batch_keys"] == sorted(case["inputs"])
        assert result["batch_max_abs_diff"] == 0.0
    assert result["logits_max_abs_diff"] < 1e-5
    if case["gate"] is not None:
        assert result["gate_max_abs_diff"] < 1e-5

    # The Hub pipeline gives the in-process model's predictions.
    assert result["pipeline_class"] == "ConversationEmotionRecognitionPipeline"
    expected = MeritsProcessor(label2id=dict(model.config.label2id)).postprocess(
        case["logits"], case["inputs"]["turn_mask"], id2label=model.config.id2label, gate_weights=case["gate"]
    )
    assert [len(turns) for turns in result["pipeline"]] == [len(turns) for turns in expected]
    for got_turns, expected_turns in zip(result["pipeline"], expected):
        for got, want in zip(got_turns, expected_turns):
            assert got["label"] == want["label"]
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-4)
            if "gate" in want:
                assert got["gate"] == pytest.approx(want["gate"], abs=1e-4)


@pytest.mark.parametrize("kind", ["mister-e-backbones", "merits-l-embeddings"])
def test_loads_from_folder_where_merits_is_not_installed(tmp_path, kind):
    model, processor, conversations, inputs = build_case(kind)
    folder = save_hub_folder(model, processor, tmp_path / "repo")
    case = _expected_case(model, processor, conversations, inputs)
    result = run_without_merits(tmp_path, str(folder), case)
    _check_fresh_result(result, case, model, processor)


def populate_hf_cache(folder: Path, cache_dir: Path, repo_id: str, commit: str) -> Path:
    """Lays `folder` out as huggingface_hub's cache does: models--{org}--{name}/{blobs, refs/main, snapshots/<commit>},
    blobs named by content hash, snapshot files as relative symlinks to the blobs."""
    repo_dir = cache_dir / f"models--{repo_id.replace('/', '--')}"
    blobs, snapshot = repo_dir / "blobs", repo_dir / "snapshots" / commit
    blobs.mkdir(parents=True)
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return repo_dir


def test_loads_from_offline_hf_cache_where_merits_is_not_installed(tmp_path):
    model, processor, conversations, inputs = build_case("merits-l-acoustic")
    folder = save_hub_folder(model, processor, tmp_path / "repo")
    cache_dir = tmp_path / "hf_cache"
    repo_dir = populate_hf_cache(folder, cache_dir, REPO_ID, COMMIT)
    snapshot_file = repo_dir / "snapshots" / COMMIT / "config.json"
    assert snapshot_file.is_symlink() and snapshot_file.resolve().parent == (repo_dir / "blobs").resolve()

    case = _expected_case(model, processor, conversations, inputs)
    result = run_without_merits(tmp_path, REPO_ID, case, extra_env={"HF_HUB_CACHE": str(cache_dir)})
    _check_fresh_result(result, case, model, processor)
    assert result["feature_extractor_class"] == "MeritsAcousticFeatureExtractor"

    # In this process too: load_hub_folder resolves the repo id from the same cache, offline.
    loaded_model, loaded_processor = load_hub_folder(REPO_ID, cache_dir=cache_dir, local_files_only=True)
    logits, _ = _logits(loaded_model, dict(loaded_processor(conversations)))
    torch.testing.assert_close(logits, case["logits"], rtol=0, atol=1e-6)


def test_auto_classes_in_process_without_remote_code(tmp_path):
    """With `merits` imported, the Auto classes resolve the registered local classes (no remote code needed)."""
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoProcessor

    model, processor, conversations, inputs = build_case("merits-l-acoustic")
    folder = save_hub_folder(model, processor, tmp_path / "repo")
    assert type(AutoConfig.from_pretrained(folder)) is MeritsConfig
    loaded_model = AutoModel.from_pretrained(folder).eval()
    assert type(loaded_model) is MeritsForConversationClassification
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert type(loaded_processor) is MeritsProcessor
    assert type(AutoFeatureExtractor.from_pretrained(folder)) is MeritsAcousticFeatureExtractor
    logits, _ = _logits(loaded_model, dict(loaded_processor(conversations)))
    torch.testing.assert_close(logits, _logits(model, inputs)[0], rtol=0, atol=1e-6)
