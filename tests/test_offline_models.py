"""The offline models (scripts/offline_models.py) and their converters.

The converter tests build a tiny random Whisper and need nothing seeded. The real-model tests load what
``python scripts/offline_models.py`` seeded (``.ci/run`` seeds it) and check what only pretrained weights pass;
they skip, naming the command, when it has not been run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from merits.conversion.ctranslate2_whisper import (ConversionError, read_ctranslate2_model, to_openai_whisper_checkpoint,
                                                   to_transformers_state_dict, whisper_sizes, write_ctranslate2_model)
from merits.conversion.offline import MODELS, model_path, verify

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", ROOT.parent / "shared" / "data"))
JFK = SHARED_DATA / "speech" / "jfk.flac"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = (re.sub(r"[^a-z' ]", " ", s.lower()).split() for s in (reference, hypothesis))
    distance = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, distance[0] = distance[0], i
        for j, h in enumerate(hyp, 1):
            previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, previous + (r != h))
    return distance[len(hyp)] / len(ref)


def test_word_error_rate():
    assert word_error_rate("a b c d", "a b c d") == 0
    assert word_error_rate("a b c d", "a x c") == 0.5
    assert word_error_rate("Ask not, what", "ask not what") == 0


def needs(name: str):
    problem = verify(MODELS[name], full=False)
    return pytest.mark.skipif(problem is not None,
                              reason=f"{name} not seeded ({problem}): run `python scripts/offline_models.py`")


# ----------------------------------------------------------------------------------------------------------
# the CTranslate2 converter on a tiny random model


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                           max_source_positions=1500, max_target_positions=448)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, visible biases everywhere (the fresh init zeroes them)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def _to_ctranslate2_variables(model) -> dict:
    """The tiny model in CTranslate2's layout, written independently of the converter under test (fused q/k/v with
    k's bias as zeros, cross-attention [k; v] fused, gamma/beta norms, float16 as faster-whisper ships)."""
    state = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    out = {}

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def lin(dst, src):
        out[f"{dst}/weight"], out[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def fuse(dst, srcs):
        out[f"{dst}/weight"] = np.concatenate([state[f"{s}.weight"] for s in srcs])
        out[f"{dst}/bias"] = np.concatenate([state[f"{s}.bias"] if f"{s}.bias" in state
                                             else np.zeros(state[f"{s}.weight"].shape[0], np.float16) for s in srcs])

    config = model.config
    out["encoder/num_heads"] = np.array(config.encoder_attention_heads, np.int16)
    for i in (1, 2):
        lin(f"encoder/conv{i}", f"model.encoder.conv{i}")
    out["encoder/position_encodings/encodings"] = state["model.encoder.embed_positions.weight"]
    for i in range(config.encoder_layers):
        s, d = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        fuse(f"{d}/self_attention/linear_0", [f"{s}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
        norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    out["decoder/num_heads"] = np.array(config.decoder_attention_heads, np.int16)
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = state["model.decoder.embed_positions.weight"]
    for i in range(config.decoder_layers):
        s, d = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        fuse(f"{d}/self_attention/linear_0", [f"{s}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
        lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        fuse(f"{d}/attention/linear_0", [f"{s}.encoder_attn.q_proj"])
        fuse(f"{d}/attention/linear_1", [f"{s}.encoder_attn.k_proj", f"{s}.encoder_attn.v_proj"])
        lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        norm(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
        norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    return out


def test_ctranslate2_roundtrip_and_openai_checkpoint(tmp_path):
    """Tiny random Whisper -> CTranslate2 model.bin (two parts) -> transformers and openai-whisper: the same values,
    and openai-whisper's own implementation computes what transformers computes from the converted weights."""
    import whisper.model
    from transformers import WhisperForConditionalGeneration

    reference = _tiny_whisper()
    variables = _to_ctranslate2_variables(reference)
    path = tmp_path / "model.bin"
    write_ctranslate2_model(path, "WhisperSpec", 3, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    blob = path.read_bytes()
    (tmp_path / "part1").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "part2").write_bytes(blob[len(blob) // 2:])
    ct2 = read_ctranslate2_model([tmp_path / "part1", tmp_path / "part2"])
    assert ct2.spec == "WhisperSpec" and ct2.revision == 3
    assert whisper_sizes(ct2) == dict(num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=448,
                                      vocab_size=51865)
    state = to_transformers_state_dict(ct2)
    expected = {k: v for k, v in reference.state_dict().items() if k != "proj_out.weight"}
    assert set(state) == set(expected)
    for name, value in expected.items():  # equal up to the float16 storage
        np.testing.assert_array_equal(state[name].astype(np.float32), value.numpy().astype(np.float16).astype(np.float32),
                                      err_msg=name)

    converted = WhisperForConditionalGeneration(reference.config).eval()
    converted.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()}, strict=False)
    converted.tie_weights()
    checkpoint = to_openai_whisper_checkpoint(ct2, dtype="float32")
    openai = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"])).eval()
    openai.load_state_dict(checkpoint["model_state_dict"])  # strict: every name maps
    mel = torch.randn(1, 80, 3000)
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 1000, 2000]])
    with torch.no_grad():
        hf_audio = converted.model.encoder(mel).last_hidden_state
        hf_logits = converted(input_features=mel, decoder_input_ids=tokens).logits
        oa_audio = openai.encoder(mel)
        oa_logits = openai.decoder(tokens, oa_audio)
    torch.testing.assert_close(oa_audio, hf_audio, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(oa_logits, hf_logits, rtol=1e-4, atol=1e-4)


def test_ctranslate2_bad_input_names_the_file(tmp_path):
    path = tmp_path / "model.bin"
    write_ctranslate2_model(path, "WhisperSpec", 3, {"encoder/num_heads": np.array(4, np.int16)})
    (tmp_path / "cut.bin").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ConversionError, match="cut.bin"):
        read_ctranslate2_model(tmp_path / "cut.bin")
    with pytest.raises(ConversionError, match="conv1"):
        whisper_sizes(read_ctranslate2_model(path))
    write_ctranslate2_model(tmp_path / "other.bin", "TransformerSpec", 1, {"x": np.zeros(2, np.float32)})
    with pytest.raises(ConversionError, match="not a CTranslate2 Whisper model"):
        whisper_sizes(read_ctranslate2_model(tmp_path / "other.bin"))


# ----------------------------------------------------------------------------------------------------------
# the command


def test_offline_models_list_and_path():
    script = [sys.executable, str(ROOT / "scripts" / "offline_models.py")]
    listing = subprocess.run(script + ["--list"], capture_output=True, text=True, check=True).stdout
    for name, model in MODELS.items():
        assert f"{name}: " in listing and str(model_path(model)) in listing
    assert listing.count("from CTranslate2 float16") == 4  # the four Whisper outputs say so
    if verify(MODELS["whisper"], full=False) is None:
        out = subprocess.run(script + ["--path", "whisper", "--quick"], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == str(model_path(MODELS["whisper"]))
    bad = subprocess.run(script + ["--only", "nonsense", "--check"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model" in bad.stderr


# ----------------------------------------------------------------------------------------------------------
# the real models (seeded)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@needs("minilm")
def test_minilm_similar_sentences_are_closer(offline):
    from transformers import AutoModel, AutoTokenizer

    name = "sentence-transformers/all-MiniLM-L6-v2"
    tokenizer, model = AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name).eval()
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar on stage.",
                 "The stock market fell sharply today.", "I am so happy to see you again!",
                 "It is wonderful to meet you once more.", "The train leaves at seven."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeds = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeds @ embeds.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[3, 4] > similarity[3, 5] + 0.3
    assert similarity[0, 1] > 0.5 and similarity[3, 4] > 0.5


def _jfk_audio():
    if not JFK.is_file():
        pytest.skip(f"{JFK} not found: set MERITS_SHARED_DATA to the shared data folder")
    from merits.data.audio import load_audio

    return load_audio(str(JFK), 16000)


@needs("whisper-base-hf")
def test_whisper_base_transformers_transcribes_jfk(offline):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained("openai/whisper-base")
    model = WhisperForConditionalGeneration.from_pretrained("openai/whisper-base").eval()
    features = processor(_jfk_audio(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = model.generate(features, language="en", task="transcribe")
    text = processor.batch_decode(ids, skip_special_tokens=True)[0]
    assert word_error_rate(JFK_TEXT, text) < 0.10, text


@needs("whisper")
def test_whisper_base_openai_checkpoint_transcribes_jfk():
    from merits.labelling.asr import load_whisper

    model = load_whisper(str(model_path(MODELS["whisper"])))
    text = model.transcribe(_jfk_audio(), language="en", fp16=False, temperature=0.0)["text"]
    assert word_error_rate(JFK_TEXT, text) < 0.10, text


@needs("whisper-base-hf")
def test_whisper_base_matches_ctranslate2(offline, tmp_path):
    """The converted transformers model against CTranslate2 running the packaged model.bin itself: encoder output
    to ~1e-5 relative and the same greedy tokens (skipped without the ctranslate2 package)."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from merits.conversion.offline import _whisper_inputs

    parts, resources = _whisper_inputs(MODELS["whisper-base-hf"])
    folder = tmp_path / "ct2"
    folder.mkdir()
    with open(folder / "model.bin", "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (folder / name).symlink_to(resources / name)
    ct2 = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32", intra_threads=2)
    processor = WhisperProcessor.from_pretrained("openai/whisper-base")
    model = WhisperForConditionalGeneration.from_pretrained("openai/whisper-base").eval()
    features = processor(_jfk_audio(), sampling_rate=16000, return_tensors="pt").input_features
    prompt = [50258, 50259, 50359, 50363]  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>
    with torch.no_grad():
        hf_encoded = model.model.encoder(features).last_hidden_state
        generated = list(prompt)  # plain greedy decoding on the model's logits (no generation-config processors)
        for _ in range(60):
            logits = model(encoder_outputs=(hf_encoded,), decoder_input_ids=torch.tensor([generated])).logits[0, -1]
            generated.append(int(logits.argmax()))
            if generated[-1] == 50257:
                break
    ct2_encoded = np.array(ct2.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    relative = np.abs(ct2_encoded - hf_encoded.numpy()).max() / np.abs(hf_encoded.numpy()).max()
    assert relative < 1e-4, relative
    result = ct2.generate(ctranslate2.StorageView.from_array(features.numpy()), [prompt], beam_size=1,
                          max_length=64, suppress_blank=False, suppress_tokens=[], return_no_speech_prob=False)
    ours = [t for t in generated[len(prompt):] if t != 50257]
    assert result[0].sequences_ids[0] == ours, (result[0].sequences_ids[0], ours)


@needs("labeller")
def test_labeller_folder_is_a_llama_that_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_path(MODELS["labeller"])
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][batch["input_ids"].shape[1]:])
