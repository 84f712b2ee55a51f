"""Every YAML in configs/ parses through merits.training's argument parser and builds the model it describes.

The paper configs name real backbones (roberta-large, Qwen/Qwen2.5-7B, microsoft/wavlm-base-plus,
openai/whisper-large-v3) that cannot be downloaded here: their published architecture sizes are written
below as local configs, and the full-size model is instantiated on the meta device (no weights, no memory,
no network). The CPU configs build their from-scratch text encoder with a tokenizer trained on a few
sentences. The EmoDB leave-speaker-out route is exercised end to end on a tiny synthetic folder corpus.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import PretrainedConfig, Qwen2Config, RobertaConfig, WavLMConfig, WhisperConfig

from merits.configuration_merits import MeritsConfig
from merits.data.demo import EMOTIONS as DEMO_EMOTIONS
from merits.data.iemocap import CLASS_SETS
from merits.data.meld import EMOTIONS as MELD_EMOTIONS
from merits.data.mosi import LABELS as MOSI_LABELS
from merits.modeling_merits import MeritsForConversationClassification
from merits.training.arguments import ConfigError, parse_args
from merits.training.stages import PSEUDO_LABELS


REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SHARED_DATA = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Published architecture sizes of the backbones the paper configs name (their config.json on the Hub).
BACKBONES = {
    "roberta-large": lambda: RobertaConfig(
        vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    ),
    "Qwen/Qwen2.5-7B": lambda: Qwen2Config(
        vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, max_position_embeddings=131072, rope_theta=1e6, tie_word_embeddings=False,
    ),
    "sentence-transformers/all-MiniLM-L6-v2": lambda: __import__("transformers").BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, type_vocab_size=2, pad_token_id=0,
    ),
    "microsoft/wavlm-base-plus": lambda: WavLMConfig(),  # the defaults are WavLM-base(-plus): 12 x 768
    "openai/whisper-base": lambda: WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, encoder_attention_heads=8,
        decoder_layers=6, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
    ),
    "openai/whisper-large-v3": lambda: WhisperConfig(
        vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
        decoder_layers=32, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
    ),
}

DATASET_LABELS = {
    "demo": list(DEMO_EMOTIONS),
    "meld": list(MELD_EMOTIONS),
    "mosi": list(MOSI_LABELS),
    "pseudo_labels": list(PSEUDO_LABELS),
    "emodb": ["anger", "boredom", "disgust", "fear", "happiness", "sadness", "neutral"],
}

PAPER_CONFIGS = {
    # name: (architecture, dataset, number of classes, text backbone, speech backbone)
    "iemocap4_merits-l": ("merits-l", "iemocap", 4, "roberta-large", "microsoft/wavlm-base-plus"),
    "meld_merits-l": ("merits-l", "meld", 7, "roberta-large", "microsoft/wavlm-base-plus"),
    "mosi_merits-l": ("merits-l", "mosi", 2, "roberta-large", "microsoft/wavlm-base-plus"),
    "iemocap6_mister-e": ("mister-e", "iemocap", 6, "Qwen/Qwen2.5-7B", "openai/whisper-large-v3"),
    "iemocap4_mister-e": ("mister-e", "iemocap", 4, "Qwen/Qwen2.5-7B", "openai/whisper-large-v3"),
    "meld_mister-e": ("mister-e", "meld", 7, "Qwen/Qwen2.5-7B", "openai/whisper-large-v3"),
    "mosi_mister-e": ("mister-e", "mosi", 2, "Qwen/Qwen2.5-7B", "openai/whisper-large-v3"),
    "msp_podcast_pretrain": ("merits-l", "pseudo_labels", 3, "roberta-large", None),
}


def label_names(args) -> list[str]:
    if args.dataset == "iemocap":
        return list(CLASS_SETS[int(args.dataset_options.get("num_classes", 4))]["names"])
    return DATASET_LABELS[args.dataset]


def model_config(args, architecture: str) -> MeritsConfig:
    """The MeritsConfig ``train.py`` builds for ``args`` (merits.training.stages.build_model), with the named
    backbones' configs taken from :data:`BACKBONES` instead of the Hub."""
    hyperparameters = {k: v for k, v in args.model.items() if k not in ("merits-l", "mister-e")}
    hyperparameters.update(args.model.get(architecture) or {})
    kwargs = dict(architecture=architecture, id2label=dict(enumerate(label_names(args))), **hyperparameters)
    if "text" in args.modalities:
        if args.text_model_name_or_path or args.text_encoder_init:
            name = args.text_model_name_or_path or args.tokenizer_name_or_path  # stage 0 output: a roberta-large
            kwargs["text_config"] = BACKBONES[name]()
        else:
            kwargs["text_config"] = dict(args.text_config, vocab_size=args.tokenizer_vocab_size, pad_token_id=1,
                                         max_position_embeddings=args.max_text_length + 4)
    if "audio" in args.modalities:
        if args.audio_model_name_or_path:
            kwargs["audio_config"] = BACKBONES[args.audio_model_name_or_path]()
        else:
            from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor

            kwargs["audio_feature_dim"] = MeritsAcousticFeatureExtractor().feature_size
    return MeritsConfig(**kwargs)


def test_every_config_is_covered():
    names = {path.stem for path in CONFIGS}
    expected = set(PAPER_CONFIGS) | {"demo", "meld_text_cpu", "mosi_text_cpu", "emodb_speech_cpu"}
    assert expected <= names, f"missing configs: {sorted(expected - names)}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_parses_and_builds_its_model(path):
    args = parse_args(["--config", str(path), "--output_dir", "/tmp/unused"])
    assert args.config == str(path)
    for architecture in args.architectures():
        config = model_config(args, architecture)
        assert config.num_labels == len(label_names(args))
        # every YAML `model:` key is a real MeritsConfig setting, kept as given
        for key, value in {**{k: v for k, v in args.model.items() if k not in ("merits-l", "mister-e")},
                           **(args.model.get(architecture) or {})}.items():
            assert hasattr(config, key), f"{path.name}: model.{key} is not a MeritsConfig setting"
            got = getattr(config, key)
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, f"{path.name}: model.{key}"
        # round trip through config.json
        again = MeritsConfig.from_dict(config.to_dict())
        assert again.to_dict() == config.to_dict()
        with torch.device("meta"):
            model = MeritsForConversationClassification(config)
        assert (model.text_encoder is not None) == ("text" in args.modalities)
        assert (model.speech_encoder is not None) == ("audio" in args.modalities)
        for stage in args.stages_for(architecture):
            trainable = model.freeze_for_stage("utterance" if stage == "pretrain" else stage)
            assert trainable, f"{path.name}: stage {stage} trains nothing"


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_hyperparameters(name):
    architecture, dataset, num_classes, text_backbone, speech_backbone = PAPER_CONFIGS[name]
    args = parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
    assert (args.architecture, args.dataset) == (architecture, dataset)
    assert args.output_dir.endswith(str(Path("outputs") / name))  # default OUT when none is given
    assert args.data_dir.startswith("/path/to/"), "data paths are placeholders users override"
    config = model_config(args, architecture)
    assert config.num_labels == num_classes
    text_hidden = config.text_config.hidden_size
    assert text_hidden == {"roberta-large": 1024, "Qwen/Qwen2.5-7B": 3584}[text_backbone]
    if speech_backbone is None:
        assert args.modalities == ["text"] and args.stages_for(architecture) == ["pretrain"]
        assert args.text_model_name_or_path == "roberta-large"
        assert (args.pretrain.num_epochs, args.pretrain.learning_rate, args.pretrain.batch_size) == (10, 2e-5, 32)  # §6 #5
        return
    assert args.audio_model_name_or_path == speech_backbone and args.audio_features is None
    if architecture == "merits-l":
        assert args.text_encoder_init is not None and args.tokenizer_name_or_path == "roberta-large"  # RoBERTa-FT
        assert args.stages_for(architecture) == ["utterance", "context", "fusion"]
        for stage in (args.context, args.fusion):  # §3.7: 50 epochs, lr 1e-4, batch 32, AdamW
            assert (stage.num_epochs, stage.learning_rate, stage.batch_size, stage.optimizer) == (50, 1e-4, 32, "adamw")
        assert config.speech_head_activation is None and config.speech_head_hidden_sizes == [768, 256]  # §2.3
        assert config.context_num_layers == 2 and config.context_text_hidden_size == 512  # §6 #8
        assert config.classification_loss == "ce"
    else:
        assert args.use_lora and (args.lora_r, args.lora_alpha, args.lora_dropout) == (8, 32, 0.1)  # §4.2
        assert args.text_model_name_or_path == "Qwen/Qwen2.5-7B"
        assert args.stages_for(architecture) == ["utterance", "moe"]
        moe = args.moe  # §4.3: Adam 1e-5, 100 epochs, batch 8 conversations, clip 1.0
        assert (moe.num_epochs, moe.learning_rate, moe.batch_size, moe.optimizer, moe.max_grad_norm) == (100, 1e-5, 8, "adam", 1.0)
        assert config.utterance_embed_dim == 2048 and config.text_pooling == "attentive_stats"
        assert (config.gate_temperature, config.focal_gamma, config.supcon_weight, config.kl_weight) == (2.0, 3.0, 2.0, 0.1)
        assert (config.fusion_num_blocks, config.fusion_attention_size, config.fusion_num_heads) == (4, 120, 3)
        assert config.context_num_layers == 3
    if dataset == "iemocap":
        scheme = args.dataset_options["split_scheme"]
        assert scheme == architecture


def test_mister_e_full_size_model_on_meta_device():
    """The 7B text LLM + Whisper-large-v3 encoder model builds at full size without allocating memory."""
    args = parse_args(["--config", str(REPO / "configs" / "iemocap6_mister-e.yaml")])
    with torch.device("meta"):
        model = MeritsForConversationClassification(model_config(args, "mister-e"))
    text = sum(p.numel() for p in model.text_encoder.parameters())
    assert 6.5e9 < text < 8.5e9, text  # Qwen2.5-7B without its LM head: ~7.1e9
    assert model.text_encoder.parameters().__next__().device.type == "meta"


def test_overrides_and_bad_configs(tmp_path):
    args = parse_args(["--config", str(REPO / "configs" / "meld_merits-l.yaml"), "--data_dir", str(tmp_path),
                       "--context.learning_rate", "5e-5", "--model.fusion_num_blocks", "2"])
    assert args.data_dir == str(tmp_path) and args.context.learning_rate == 5e-5 and args.model["fusion_num_blocks"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("architecture: merits-l\nutterance: {num_epochs: 3, learnin_rate: 1e-4}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*utterance.learnin_rate"):
        parse_args(["--config", str(bad)])
    folds = tmp_path / "folds.yaml"
    folds.write_text("architecture: merits-l\ndataset: emodb\nspeaker_folds: true\nmodalities: [text]\n")
    with pytest.raises(ConfigError, match="speaker_folds"):
        parse_args(["--config", str(folds)])
    folds.write_text("architecture: merits-l\ndataset: emodb\nspeaker_folds: true\nmodalities: [audio]\n"
                     "stages: [utterance]\nfold_candidates: [3]\n")
    with pytest.raises(ConfigError, match=r"fold_candidates\[0\]"):
        parse_args(["--config", str(folds)])


def test_cpu_text_configs_build_a_trainable_text_encoder():
    """The from-scratch encoder of the CPU configs, with a tokenizer trained locally, runs a stage I step."""
    import datasets

    from merits.data.demo import train_demo_tokenizer

    torch.set_num_threads(1)
    texts = ["oh my god , you are so funny !", "i do not want to go there .", "what ? no way !", "okay , fine ."] * 8
    for name in ("meld_text_cpu", "mosi_text_cpu"):
        args = parse_args(["--config", str(REPO / "configs" / f"{name}.yaml")])
        assert args.train_tokenizer and args.modalities == ["text"]
        assert args.stages_for("merits-l") == ["utterance", "context"]
        tokenizer = train_demo_tokenizer(datasets.Dataset.from_dict({"text": texts}), vocab_size=120, model="bpe")
        config = model_config(args, "merits-l")
        config.text_config.vocab_size = len(tokenizer)
        config.text_config.pad_token_id = tokenizer.pad_token_id
        model = MeritsForConversationClassification(config)
        model.freeze_for_stage("utterance")
        encoded = tokenizer(texts[:4], padding=True, return_tensors="pt")
        labels = torch.tensor([[0, 1, 0, 1]]) % config.num_labels
        output = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                       turn_mask=torch.ones(1, 4, dtype=torch.long), labels=labels)
        assert output.utterance_text_logits.shape == (1, 4, config.num_labels)
        output.loss.backward()
        assert torch.isfinite(output.loss)


def _synthetic_emotion_folder(root: Path, speakers=("01", "02", "03", "04"), per_class: int = 4) -> Path:
    """Two "emotions" that differ in pitch and loudness, spoken by 4 speakers: a learnable folder corpus."""
    rng = np.random.default_rng(0)
    rows = []
    (root / "wav").mkdir(parents=True)
    for speaker_index, speaker in enumerate(speakers):
        for emotion, (pitch, gain) in {"anger": (260.0, 0.6), "sadness": (110.0, 0.1)}.items():
            for k in range(per_class):
                t = np.arange(int(0.6 * 16000)) / 16000
                f0 = pitch * (1 + 0.05 * speaker_index) * (1 + 0.03 * rng.standard_normal())
                wave = gain * np.sin(2 * np.pi * f0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.size)
                name = f"wav/{speaker}_{emotion}_{k}.wav"
                sf.write(root / name, wave.astype(np.float32), 16000)
                rows.append({"file": name, "speaker": speaker, "emotion": emotion})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "speaker", "emotion"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_speaker_folds_end_to_end(tmp_path):
    """emodb_speech_cpu.yaml's route (leave-one-speaker-out, two candidates, final model on every speaker) on a
    tiny synthetic folder corpus; the run resumes from its fold records; best/ is accepted by `merits evaluate`."""
    from merits.cli import main as cli_main
    from merits.training import main

    torch.set_num_threads(1)
    data = _synthetic_emotion_folder(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "configs" / "emodb_speech_cpu.yaml"), "--dataset", "folder", "--data_dir", str(data),
            "--output_dir", str(out), "--utterance.num_epochs", "4", "--utterance.batch_size", "8",
            "--fold_candidates", "[{}, {model.speech_head_activation: relu}]"]
    results = main(argv)
    assert results["speaker_folds"] == 4 and results["fold_candidates"] == 2
    for key in ("test_stage1_audio_weighted_f1", "loso_stage1_audio_unweighted_average_recall",
                "validation_stage1_audio_weighted_f1", "candidate1_test_stage1_audio_weighted_f1"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["test_stage1_audio_weighted_f1"] > 0.8, results  # pitch/loudness separate the two classes
    assert 1 <= results["final_epochs"] <= 4
    records = json.loads((out / "fold_records.json").read_text())
    assert len(records) == 2 and all(len(folds) == 4 for folds in records)
    for folds in records:  # a speaker never validates or tests in the same fold, every speaker is tested once
        assert sorted(r["test_speaker"] for r in folds) == ["01", "02", "03", "04"]
        assert all(r["test_speaker"] != r["validation_speaker"] for r in folds)
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["test_stage1_audio_weighted_f1"] == results["test_stage1_audio_weighted_f1"]

    # a rerun with --resume reads the fold records instead of training again, and ends with the same figures
    again = main(argv + ["--resume"])
    assert again["test_stage1_audio_weighted_f1"] == results["test_stage1_audio_weighted_f1"]

    report = tmp_path / "evaluate.json"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(["evaluate", "--model", str(out / "best"), "--dataset", "emodb", "--file", str(data / "labels.csv")])
    assert code in (0, None)
    scores = json.loads(buffer.getvalue().strip().splitlines()[-1])
    report.write_text(json.dumps(scores))
    assert scores["num_utterances"] == 32 and scores["weighted_f1"] > 0.8


def test_speaker_folds_need_a_speaker_column(tmp_path):
    from merits.training import main
    from merits.training.stages import DataError

    data = _synthetic_emotion_folder(tmp_path / "corpus", speakers=("01", "02"), per_class=1)
    with pytest.raises(DataError, match="at least 3 speakers"):
        main(["--config", str(REPO / "configs" / "emodb_speech_cpu.yaml"), "--dataset", "folder", "--data_dir", str(data),
              "--output_dir", str(tmp_path / "out"), "--utterance.num_epochs", "1"])
    with pytest.raises(DataError, match="no 'spk' column"):
        main(["--config", str(REPO / "configs" / "emodb_speech_cpu.yaml"), "--dataset", "folder", "--data_dir", str(data),
              "--output_dir", str(tmp_path / "out2"), "--utterance.num_epochs", "1", "--speaker_column", "spk"])


@pytest.mark.skipif(not (SHARED_DATA / "emodb" / "labels.csv").is_file(),
                    reason=f"EmoDB not found at {SHARED_DATA / 'emodb'} (set MERITS_SHARED_DATA)")
def test_emodb_config_reads_the_real_corpus():
    """The real EmoDB labels.csv loads through the config's loader: 8 speakers, 7 emotions, 408 clips."""
    from merits.data import load_emodb

    args = parse_args(["--config", str(REPO / "configs" / "emodb_speech_cpu.yaml"), "--data_dir", str(SHARED_DATA / "emodb")])
    dataset = load_emodb(args.data_dir)["train"]
    assert len(dataset) == 408 and len(set(dataset[args.speaker_column])) == 8
    assert dataset.features["label"].names == DATASET_LABELS["emodb"]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_py_help_prints_usage_and_exits_0(flag):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(REPO / "train.py"), flag, "--config", "configs/demo.yaml"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: train.py") and "learning_rate" in done.stdout
    assert "error" not in done.stderr


def _tiny_whisper_backbone(folder: Path) -> Path:
    """A tiny random Whisper (80 mel bins, 30 s of positions) saved with its feature extractor."""
    from transformers import WhisperFeatureExtractor, WhisperModel

    from _tiny import tiny_whisper_config

    torch.manual_seed(0)
    WhisperModel(tiny_whisper_config(num_mel_bins=80, max_source_positions=1500)).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("head", ["concat", "weighted_sum"])
def test_speaker_folds_on_a_frozen_whisper_encoder(tmp_path, head):
    """emodb_whisper_cpu.yaml's route with a tiny random Whisper: the backbone's pooled layers are computed once, the
    head (per-layer standardisation + the layers side by side, or learned layer weights) is trained per fold on them,
    and best/ is the whole model (encoder + head) reading raw audio: `merits evaluate` on it scores the corpus as the
    trained head did. `head` keeps one of the config's two candidates."""
    from merits.cli import main as cli_main
    from merits.training import main

    torch.set_num_threads(1)
    data = _synthetic_emotion_folder(tmp_path / "corpus")
    backbone = _tiny_whisper_backbone(tmp_path / "whisper")
    out = tmp_path / "out"
    argv = ["--config", str(REPO / "configs" / "emodb_whisper_cpu.yaml"), "--dataset", "folder", "--data_dir", str(data),
            "--audio_model_name_or_path", str(backbone), "--output_dir", str(out), "--utterance.num_epochs", "6",
            "--utterance.batch_size", "8"]
    candidate = {"concat": {}, "weighted_sum": {"model.speech_layer_combination": "weighted_sum",
                                                "model.speech_head_hidden_sizes": [8]}}[head]
    argv += ["--fold_candidates", json.dumps([candidate])]
    results = main(argv)
    assert results["speaker_folds"] == 4 and 1 <= results["final_epochs"] <= 6
    assert 0.0 <= results["loso_stage1_audio_weighted_f1"] <= 1.0
    cached = sorted((out / "cache").glob("backbone_layers_*.npy"))  # as recorded, then the config's two speeds
    assert [p.name.rsplit("_", 1)[-1] for p in cached[1:]] == ["speed0.9.npy", "speed1.1.npy"]
    assert all(np.load(p).shape == (32, 3, 16) for p in cached)  # 32 clips, 2 layers + embeddings, d_model 16
    # each refit trains its candidate's median best epoch count on training + validation speakers and keeps the LAST
    # epoch (scored on its own training data, the first epoch to fit it would otherwise stay selected)
    records = json.loads((out / "fold_records.json").read_text())
    refits = sorted((out / "folds").glob("candidate*/speaker_*/refit/fold_predictions.json"))
    assert len(refits) == 4
    for refit in refits:
        candidate = int(refit.parts[-4].removeprefix("candidate"))
        epochs = max(1, int(round(float(np.median([r["best_epoch"] for r in records[candidate]])))))
        assert json.loads(refit.read_text())["best_epoch"] == epochs, refit

    best = MeritsForConversationClassification.from_pretrained(out / "best")
    encoder = best.speech_encoder
    assert encoder.backbone is not None and encoder.layer_mean.shape == (3, 16)
    layers = np.load(cached[0])
    assert np.allclose(encoder.layer_mean.numpy(), layers.mean(0), atol=1e-5)  # standardised on every speaker
    assert best.config.speech_layer_combination == head
    if head == "concat":  # 3 layers x 16 side by side, read by the classifier directly
        assert encoder.layer_weights is None and encoder.classifier.in_features == 48
    else:
        assert not torch.allclose(encoder.layer_weights, torch.zeros(3))  # learned

    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(["evaluate", "--model", str(out / "best"), "--dataset", "emodb", "--file", str(data / "labels.csv")])
    assert code in (0, None)
    scores = json.loads(buffer.getvalue().strip().splitlines()[-1])
    assert scores["num_utterances"] == 32
    # the whole model on raw audio agrees with the head trained on the cached layers (same utterances, same weights)
    assert abs(scores["weighted_f1"] - results["final_fit_train_weighted_f1"]) < 1e-6, (scores, results)


def test_speaker_folds_on_a_backbone_need_layer_standardisation(tmp_path):
    from merits.training import main

    with pytest.raises(ConfigError, match="standardize_speech_layers"):
        main(["--config", str(REPO / "configs" / "emodb_whisper_cpu.yaml"), "--output_dir", str(tmp_path / "out"),
              "--model.standardize_speech_layers", "false"])


def test_speaker_folds_add_speed_perturbed_training_clips(tmp_path, monkeypatch):
    """`audio_speed_perturbation: [0.9, 1.1]`: the backbone's pooled layers are cached once per speed; every fit
    (fold, refit, final model) trains on its training clips at the three speeds, while validation and test clips
    and the layer standardisation stay those of the clips as recorded."""
    from merits.training import main, speaker_folds

    torch.set_num_threads(1)
    data = _synthetic_emotion_folder(tmp_path / "corpus")
    backbone = _tiny_whisper_backbone(tmp_path / "whisper")
    sizes = []
    real_run_stage = speaker_folds.run_stage

    def counting_run_stage(model, plan, args, run_dir):
        sizes.append((Path(run_dir).name, len(plan.train), len(plan.validation), len(plan.test or [])))
        return real_run_stage(model, plan, args, run_dir)

    monkeypatch.setattr(speaker_folds, "run_stage", counting_run_stage)
    out = tmp_path / "out"
    results = main(["--config", str(REPO / "configs" / "emodb_whisper_cpu.yaml"), "--dataset", "folder",
                    "--data_dir", str(data), "--audio_model_name_or_path", str(backbone), "--output_dir", str(out),
                    "--utterance.num_epochs", "2", "--utterance.batch_size", "8", "--fold_candidates", "[{}]",
                    "--audio_speed_perturbation", "[0.9, 1.1]"])
    assert 0.0 <= results["loso_stage1_audio_weighted_f1"] <= 1.0
    cached = {p.name.rsplit("_", 1)[-1]: np.load(p) for p in (out / "cache").glob("backbone_layers_*.npy")}
    assert sorted(cached) == sorted(["speed0.9.npy", "speed1.1.npy", next(k for k in cached if "speed" not in k)])
    original = next(v for k, v in cached.items() if "speed" not in k)
    assert all(v.shape == original.shape and not np.allclose(v, original) for v in cached.values() if v is not original)
    # 4 speakers x 8 clips: a fold trains on 2 speakers (16 clips x 3 speeds), validates and tests on 8 clips each;
    # a refit trains on 3 speakers, the final model on all 4 (its training clips stand in for validation)
    folds = [s for s in sizes if s[0].startswith("speaker_")]
    refits = [s for s in sizes if s[0] == "refit"]
    assert folds == [(f, 48, 8, 8) for f, *_ in folds] and len(folds) == 4
    assert refits == [("refit", 72, 24, 8)] * 4
    assert sizes[-1] == ("final", 96, 32, 0)
    best = MeritsForConversationClassification.from_pretrained(out / "best")
    assert np.allclose(best.speech_encoder.layer_mean.numpy(), original.mean(0), atol=1e-5)  # as recorded


@pytest.mark.parametrize("options,message", [
    (["--audio_speed_perturbation", "[1.0]"], "between 0.5 and 2 other than 1"),
    (["--audio_speed_perturbation", "[0.9, 3]"], "between 0.5 and 2 other than 1"),
    (["--audio_speed_perturbation", "[0.9]", "--config", str(REPO / "configs" / "emodb_speech_cpu.yaml")],
     "needs a speech backbone"),
    (["--audio_speed_perturbation", "[0.9]", "--speaker_folds", "false"], "speaker_folds only"),
])
def test_bad_speed_perturbation_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(REPO / "configs" / "emodb_whisper_cpu.yaml"), *options])
