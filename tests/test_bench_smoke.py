"""Smoke tests of the benchmark code paths (bench/): tiny sizes, no timing claims.

They check that the reference re-implementations keep the reference quirks (no masking), that the
baselines and FLOP counters compute what they say, and that every benchmark entry point runs end to
end on tiny inputs with ``--quick`` / ``--no_record`` (nothing is written to bench/results.json).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import baselines  # noqa: E402
from bench import bench_accuracy, bench_extraction, bench_training  # noqa: E402
from bench.reference import merits_l as ref_l  # noqa: E402
from bench.reference import mister_e as ref_e  # noqa: E402

torch.set_num_threads(1)
SHARED = Path(os.environ.get("MERITS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _tiny_batch(lengths=(5, 3), dim=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    convs = [{"audio": torch.randn(n, dim, generator=g), "text": torch.randn(n, dim, generator=g),
              "labels": torch.randint(0, classes, (n,), generator=g)} for n in lengths]
    return ref_e.pad_batch(convs)


# ------------------------------------------------------------------------------------------ reference loops


def test_reference_moe_trains_and_keeps_the_unmasked_padding_quirk():
    torch.manual_seed(0)
    model = ref_e.ReferenceAttentionMoE(input_dim=16, num_classes=4, hidden_dim=8, fusion_dim=12, num_blocks=1)
    audio, text, labels = _tiny_batch()
    assert labels[1, 3:].eq(-1).all() and audio[1, 3:].eq(0).all()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [ref_e.train_step(model, optimizer, audio, text, labels) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the reference does not mask: changing what sits in the padding changes a real turn's output
    model.eval()
    with torch.no_grad():
        base = model(audio, text)["logits"][1, :3]
        noisy_audio = audio.clone()
        noisy_audio[1, 3:] = 5.0
        moved = model(noisy_audio, text)["logits"][1, :3]
    assert not torch.allclose(base, moved)
    pred, gold = ref_e.predict(model, audio, text, labels)
    assert len(pred) == len(gold) == 8  # pads dropped before scoring


def test_reference_losses_match_their_definitions():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, -1]])
    ce = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, :1])
    expected = (1 - torch.exp(-ce)) ** 3 * ce / 2  # pads count as zeros in the mean over B*T
    assert torch.allclose(ref_e.focal_loss(logits, labels), expected)
    # SupCon counts the padded rows (label -1) as a class of their own
    a = torch.randn(1, 3, 4)
    t = torch.randn(1, 3, 4)
    with_pad = ref_e.supcon_loss(a, t, torch.tensor([[0, 1, -1]]))
    relabelled = ref_e.supcon_loss(a, t, torch.tensor([[0, 1, 1]]))
    assert not torch.allclose(with_pad, relabelled)


def test_reference_stage2_softmax_runs_over_queries():
    torch.manual_seed(0)
    encoder = ref_l.ReferenceBiGRUSelfAttention(input_dim=6, hidden_dim=5, num_classes=3)
    hidden = torch.randn(2, 4, 10)
    # the quirk: softmax over dim=1 makes every key COLUMN of the attention sum to one
    half = encoder.attention_forward(hidden[..., :5])
    weights = torch.softmax(torch.bmm(half, half.transpose(1, 2)), dim=1)
    assert torch.allclose(weights.sum(1), torch.ones(2, 4))
    assert not torch.allclose(weights.sum(2), torch.ones(2, 4))
    audio, text, labels = _tiny_batch(dim=6, classes=3)
    model = ref_l.ReferenceMeritsL(6, 6, 3, text_hidden=5, audio_hidden=4, fusion_dim=12, fusion_blocks=1)
    for stage in ("context", "fusion"):
        optimizer = ref_l.make_optimizer(model, stage, lr=1e-2)
        losses = [ref_l.train_step(model, optimizer, audio, text, labels, stage) for _ in range(10)]
        assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="unknown stage"):
        model.stage_parameters("moe")


# ------------------------------------------------------------------------------------------ baselines


def test_tfidf_logreg_and_svm_on_separable_toys():
    texts = ["i love this", "so happy today", "great fun", "i hate this", "so sad today", "awful pain"] * 3
    labels = ["pos", "pos", "pos", "neg", "neg", "neg"] * 3
    result = baselines.tfidf_logreg(texts, labels, texts[:6], labels[:6])
    assert result["weighted_f1"] == 1.0 and result["C_selection"] == "tuned on dev"
    with pytest.raises(ValueError, match="differ in length"):
        baselines.tfidf_logreg(texts, labels[:-1], texts, labels)

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30)
    x = rng.standard_normal((60, 5)) + 3 * y[:, None]
    speakers = np.repeat(["a", "b", "c"], 20)
    svm = baselines.speaker_independent_svm(x, y, speakers)
    assert svm["folds"] == 3 and svm["weighted_f1"] > 0.9 and len(svm["C_per_fold"].split(",")) == 3
    with pytest.raises(ValueError, match="at least 2 speakers"):
        baselines.speaker_independent_svm(x, y, ["a"] * 60)


def test_mfcc_statistics_separate_tones():
    t = np.arange(16000) / 16000
    low = baselines.mfcc_statistics(np.sin(2 * np.pi * 200 * t))
    high = baselines.mfcc_statistics(np.sin(2 * np.pi * 3000 * t))
    assert low.shape == (6 * 20 + 4,) and np.isfinite(low).all()
    assert np.abs(low - high).max() > 1.0
    with pytest.raises(ValueError, match="mono"):
        baselines.mfcc_statistics(np.zeros((2, 100)))


# ------------------------------------------------------------------------------------------ bench_training


def test_synthetic_conversations_and_length_grouping():
    items = bench_training.synthetic_conversations(40, 8, seed=0)
    lengths = [len(it["labels"]) for it in items]
    assert min(lengths) >= 20 and max(lengths) <= 110 and 35 < np.mean(lengths) < 65
    assert items[0]["text_embeds"].shape == (lengths[0], 8)
    random_ratio = bench_training.padding_ratio(items, bench_training.random_batches(items, 8, 0))
    grouped_ratio = bench_training.padding_ratio(items, bench_training.length_grouped_batches(items, 8, 0))
    assert 1.0 <= grouped_ratio < random_ratio


@pytest.mark.parametrize("system", ["mister-e", "merits-l"])
@pytest.mark.parametrize("impl", ["reference", "ours"])
def test_training_workers_run_in_process(system, impl):
    ns = type("Args", (), dict(dim=16, hidden=4, fusion_dim=12, epochs=1, batch_size=4, seed=0, profile=False,
                               threads=1))()
    train = bench_training.synthetic_conversations(4, 16, seed=0, min_turns=3, max_turns=8, mean_turns=5)
    validation = bench_training.synthetic_conversations(2, 16, seed=1, min_turns=3, max_turns=8, mean_turns=5)
    run = bench_training.run_mister_e if system == "mister-e" else bench_training.run_merits_l
    result = run(impl, train, validation, ns)
    keys = ["train_utterances_per_second"] if system == "mister-e" else ["context_train_utterances_per_second", "fusion_train_utterances_per_second"]
    for key in keys:
        assert result[key] > 0
    f1_keys = [k for k in result if k.endswith("weighted_f1")]
    assert f1_keys and all(0.0 <= result[k] <= 1.0 for k in f1_keys)


@pytest.mark.parametrize("system", ["mister-e", "merits-l"])
def test_training_paired_timing_runs_both_sides_in_process(system):
    ns = type("Args", (), dict(dim=16, hidden=4, fusion_dim=12, epochs=1, batch_size=2, seed=0, profile=False,
                               threads=1, paired_epochs=1))()
    train = bench_training.synthetic_conversations(4, 16, seed=0, min_turns=3, max_turns=8, mean_turns=5)
    validation = bench_training.synthetic_conversations(2, 16, seed=1, min_turns=3, max_turns=8, mean_turns=5)
    result = bench_training.run_paired(system, train, validation, ns)
    prefixes = [""] if system == "mister-e" else ["context_", "fusion_"]
    for prefix in prefixes:
        ours = result[f"ours/{prefix}paired_train_utterances_per_second"]
        reference = result[f"reference/{prefix}paired_train_utterances_per_second"]
        assert ours > 0 and reference > 0
        assert result[f"{prefix}paired_speedup_ours_vs_reference"] == pytest.approx(ours / reference)


def test_training_driver_subprocess_quick():
    args = type("Args", (), dict(dim=16, hidden=4, fusion_dim=12, epochs=1, batch_size=4, seed=0, profile=False,
                                 threads=1, train_dialogues=3, validation_dialogues=2))()
    result = bench_training.launch("mister-e", "reference", args)
    assert result["peak_rss_mb"] >= result["rss_after_data_mb"] > 0


# ------------------------------------------------------------------------------------------ bench_extraction


def test_flop_counts_match_parameter_counts():
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    config = RobertaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4)
    weights = sum(p.numel() for n, p in RobertaLayer(config).named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert weights == bench_extraction.transformer_layer_params(32, 64)
    assert bench_extraction.transformer_flops([10], 1, 32, 64) == 2 * weights * 10 + 4 * 32 * 100
    assert bench_extraction.wav2vec_frames(16000, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))[-1] == 49


def test_extraction_quick_text_runs(monkeypatch):
    from merits.data import cache

    plans = []
    planner = cache.length_batches

    def spy(lengths, batch_size, max_tokens=None):
        plans.append((list(lengths), batch_size, max_tokens))
        return planner(lengths, batch_size, max_tokens)

    monkeypatch.setattr(cache, "length_batches", spy)  # the benchmark's batches are the embedding cache's
    figures = bench_extraction.main(["--quick", "--no_record", "--modalities", "text", "--threads", "1",
                                     "--max_tokens", "30", "--bf16", "off"])
    assert len(plans) == 1 and plans[0][1:] == (64, 30)
    assert figures["text/batches"] == len(planner(*plans[0]))
    assert figures["text/naive_utterances_per_second"] > 0
    assert figures["text/max_abs_diff_naive_vs_batched"] < 1e-3  # batching must not change the embeddings
    assert figures["text/padded_per_real_positions"] >= 1.0
    assert 0 < figures["text/batched_fraction_of_matmul_peak"]
    assert 0 < figures["text/batched_fraction_of_ffn_shape_matmul"] and figures["text/ffn_matmul_shape"] == "30x64x128"
    assert "text/batched_bf16_gflops_per_second" not in figures


def test_matmul_peak_shapes_and_dtypes():
    import torch

    assert bench_extraction.matmul_peak_gflops(shape=(8, 16, 32), repeats=2) > 0
    assert bench_extraction.matmul_peak_gflops(64, repeats=2, dtype=torch.bfloat16) > 0


# ------------------------------------------------------------------------------------------ bench_accuracy


def test_stage_value_picks_the_named_stage():
    results = {"validation_stage1_text_weighted_f1": 0.4, "validation_stage2_text_weighted_f1": 0.5,
               "test_stage2_text_weighted_f1": 0.9, "validation_stage2_audio_weighted_f1": 0.3}
    assert bench_accuracy.stage_value(results, ("stage1",)) == 0.4
    assert bench_accuracy.stage_value(results, ("stage2",)) == 0.5
    assert bench_accuracy.stage_value(results, ("stage2",), modality="audio") == 0.3
    assert bench_accuracy.stage_value(results, ("stage3",)) is None


def test_output_dir_prefers_a_given_trainer_run(tmp_path):
    args = type("Args", (), dict(trainer_output=[f"meld={tmp_path / 'elsewhere'}"], work_dir=tmp_path / "work"))()
    assert bench_accuracy.output_dir(args, "meld") == tmp_path / "elsewhere"
    assert bench_accuracy.output_dir(args, "mosi") == tmp_path / "work" / "mosi"
    args.trainer_output = ["meld"]
    with pytest.raises(SystemExit, match="TASK=DIR"):
        bench_accuracy.output_dir(args, "meld")


def test_run_trainer_names_a_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        bench_accuracy.run_trainer("configs/no_such.yaml", tmp_path / "out", [], tmp_path)


def test_tfidf_on_real_mosi_slice():
    if not (SHARED / "mosi" / "mosi_label.csv").is_file():
        pytest.skip(f"{SHARED / 'mosi'} not found: set MERITS_SHARED_DATA to the shared data folder")
    from merits.data.mosi import load_mosi

    corpus = load_mosi(SHARED / "mosi", with_audio=False)
    train, dev = corpus["train"].select(range(400)), corpus["validation"]
    result = baselines.tfidf_logreg(train["text"], train["label"], dev["text"], dev["label"], C=1.0)
    assert 0.5 < result["accuracy"] <= 1.0


def test_stage0_comparison_pairs_seeds_and_refuses_mixed_arms(tmp_path, monkeypatch):
    import json

    from bench import bench_stage0

    def run(name, seed, init, stage1, stage2):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "all_results.json").write_text(json.dumps({"validation_stage1_text_weighted_f1": stage1,
                                                             "validation_stage2_text_weighted_f1": stage2}))
        (folder / "run_config.yaml").write_text(f"seed: {seed}\ntext_encoder_init: {init or 'null'}\n")
        return str(folder)

    without = [run("a1", 1, None, 0.50, 0.55), run("a2", 2, None, 0.52, 0.57)]
    with_ = [run("b1", 1, "s0/best", 0.51, 0.54), run("b2", 2, "s0/best", 0.55, 0.58)]
    recorded = {}
    monkeypatch.setattr(bench_stage0, "record", lambda name, figures, notes="": recorded.update(figures))
    bench_stage0.main(["--without", ",".join(without), "--with", ",".join(with_)])
    assert recorded["difference/stage1_paired"] == [1.0, 3.0] and recorded["difference/stage2_mean"] == 0.0
    assert recorded["with_stage0/stage1_mean"] == 53.0 and recorded["without_stage0/seeds"] == [1, 2]
    with pytest.raises(SystemExit, match="same seeds"):
        bench_stage0.main(["--without", ",".join(without), "--with", ",".join(with_[::-1])])
    with pytest.raises(SystemExit, match="must not use text_encoder_init"):
        bench_stage0.main(["--without", ",".join(with_), "--with", ",".join(with_)])


def test_real_models_probe_adds_extra_views_to_training_rows_only(monkeypatch):
    """bench_real_models.loso_probe(..., extra_views): a speed-perturbed view joins every fit's training rows (the
    C search and the refit), never the validation or test rows it predicts."""
    from bench import bench_real_models

    fits = []

    class Recorder:
        def fit(self, x, y):
            fits.append(x.shape[0])
            self.label = y[0]
            return self

        def predict(self, x):
            fits.append(("predict", x.shape[0], bool((x < 0).any())))
            return np.array([self.label] * len(x))

    monkeypatch.setattr(bench_real_models, "logreg", lambda C: Recorder())
    speakers = np.repeat(np.array(["a", "b", "c", "d"]), 5)
    labels = np.tile(np.array(["x", "y", "x", "y", "x"]), 4)
    x = np.ones((20, 3))
    bench_real_models.loso_probe(x, labels, speakers, extra_views=[-np.ones((20, 3))])
    predicted = [f for f in fits if isinstance(f, tuple)]
    assert predicted and not any(negative for _, _, negative in predicted)  # only the recorded clips are predicted
    trained = [f for f in fits if not isinstance(f, tuple)]
    # per fold: 7 C values on 2 training speakers (10 clips x 2 views), then the refit on 3 speakers (15 x 2)
    assert trained == ([20] * len(bench_real_models.C_GRID) + [30]) * 4


def test_real_models_neighbour_mean_stays_inside_each_conversation():
    """bench_real_models.neighbour_mean: the context probe's features average the k previous and next utterances of
    the SAME conversation (never the utterance itself, never another conversation's)."""
    from bench import bench_real_models

    x = np.array([[1.0], [2.0], [4.0], [8.0], [100.0], [200.0]])
    conversations = np.array(["a", "a", "a", "a", "b", "b"])
    turns = np.array([0, 1, 2, 3, 0, 1])
    one = bench_real_models.neighbour_mean(x, conversations, turns, 1)[:, 0]
    assert one.tolist() == [2.0, 2.5, 5.0, 4.0, 200.0, 100.0]
    every = bench_real_models.neighbour_mean(x, conversations, turns, None)[:, 0]
    assert every.tolist() == [14 / 3, 13 / 3, 11 / 3, 7 / 3, 200.0, 100.0]
    alone = bench_real_models.neighbour_mean(np.ones((1, 2)), np.array(["c"]), np.array([0]), None)
    assert alone.tolist() == [[0.0, 0.0]]
