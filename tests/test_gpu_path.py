"""GPU-path follow-ups of issue 18: transformers-version compatibility of the config, batch-exact speech
backbones, host syncs of the context encoders."""

import pytest
import torch

from merits.configuration_merits import MeritsConfig


def test_config_declares_no_defaults_at_init(tmp_path):
    # transformers 5.17's to_diff_dict / save_pretrained build `self.__class__()` unless the class says it has no
    # defaults; MeritsConfig() without a modality is an error by design, so save_pretrained failed there
    assert MeritsConfig.has_no_defaults_at_init is True
    config = MeritsConfig(text_embed_dim=8)
    config.save_pretrained(tmp_path)
    assert MeritsConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_turn_plan_host_bookkeeping_equals_device_route():
    from merits.modeling_merits import MeritsTurnPlan

    turn_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    plain = MeritsTurnPlan(turn_mask, gap=2)
    MeritsTurnPlan.host_bookkeeping = True
    try:
        host = MeritsTurnPlan(turn_mask, gap=2)
    finally:
        MeritsTurnPlan.host_bookkeeping = None
    assert host.turn_mask is turn_mask
    for name, value in plain.__dict__.items():
        other = getattr(host, name)
        if isinstance(value, torch.Tensor):
            assert other.device == value.device and torch.equal(other, value), name
        else:
            assert other == value, name


def _group_norm_speech_model():
    from merits import MeritsConfig, MeritsForConversationClassification
    from tests._tiny import tiny_wavlm_config

    torch.manual_seed(0)
    config = MeritsConfig(audio_config=tiny_wavlm_config(feat_extract_norm="group"), id2label={0: "a", 1: "b"})
    return MeritsForConversationClassification(config).eval()


@pytest.fixture(params=[None, False], ids=["by-device", "batched"])
def feature_encoder_route(request, monkeypatch):
    # None: the CPU route (each utterance on its own samples); False: the batched masked GroupNorm (the GPU route)
    from merits.modeling_merits import MeritsSpeechEncoder

    monkeypatch.setattr(MeritsSpeechEncoder, "feature_encoder_per_utterance", request.param)
    return request.param


def test_group_norm_speech_backbone_is_batch_exact(feature_encoder_route):
    # GroupNorm in a wav2vec2/WavLM "group" feature encoder normalises over the whole (padded) time axis: a short
    # utterance padded to a longer one's length got other embeddings (and logits) than alone
    model = _group_norm_speech_model()
    generator = torch.Generator().manual_seed(1)
    short, long = torch.randn(1600, generator=generator), torch.randn(4000, generator=generator)
    values = torch.zeros(2, 4000)
    values[0, :1600], values[1] = short, long
    mask = torch.zeros(2, 4000, dtype=torch.long)
    mask[0, :1600], mask[1] = 1, 1
    with torch.no_grad():
        batched = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        alone = model.get_utterance_embeddings(input_values=short.unsqueeze(0),
                                               audio_attention_mask=torch.ones(1, 1600, dtype=torch.long))["audio"]
        alone_long = model.get_utterance_embeddings(input_values=long.unsqueeze(0))["audio"]
        # the conversation forward: one conversation alone vs batched with a longer one
        out_alone = model(input_values=short.unsqueeze(0), audio_attention_mask=torch.ones(1, 1600, dtype=torch.long),
                          turn_mask=torch.ones(1, 1, dtype=torch.bool)).logits
        out_batched = model(input_values=values, audio_attention_mask=mask,
                            turn_mask=torch.ones(2, 1, dtype=torch.bool)).logits
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[1], alone_long[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_batched[0], out_alone[0], rtol=1e-5, atol=1e-6)


def test_group_norm_speech_backbone_row_without_samples_gives_zeros(feature_encoder_route):
    model = _group_norm_speech_model()
    values = torch.randn(2, 2000)
    mask = torch.zeros(2, 2000, dtype=torch.long)
    mask[1, :1200] = 1
    with torch.no_grad():
        audio = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        alone = model.get_utterance_embeddings(input_values=values[1:, :1200])["audio"]
    pooled_zero = model.speech_encoder.head(torch.zeros(1, model.config.audio_config.hidden_size))
    torch.testing.assert_close(audio[0], pooled_zero[0])
    torch.testing.assert_close(audio[1], alone[0], rtol=1e-5, atol=1e-6)


def test_masked_group_norm_equals_group_norm_on_an_unpadded_sample():
    from merits.modeling_merits import masked_group_norm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(num_groups=6, num_channels=6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    sample = torch.randn(1, 6, 37) * 3 + 1
    full = torch.ones(1, 37, dtype=torch.bool)
    torch.testing.assert_close(masked_group_norm(norm, sample, full), norm(sample), rtol=1e-5, atol=1e-5)
    # padded: the valid frames equal the GroupNorm of the valid frames alone, whatever the padding holds
    padded = torch.cat([sample, torch.randn(1, 6, 20) * 100], dim=-1)
    valid = torch.arange(57)[None] < 37
    torch.testing.assert_close(masked_group_norm(norm, padded, valid)[..., :37], norm(sample), rtol=1e-5, atol=1e-5)
    # groups of several channels, a batch of two lengths
    grouped = torch.nn.GroupNorm(num_groups=2, num_channels=6, eps=1e-3)
    batch = torch.randn(2, 6, 30)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    got = masked_group_norm(grouped, batch, mask)
    torch.testing.assert_close(got[0], grouped(batch[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :, :11], grouped(batch[1:, :, :11])[0], rtol=1e-5, atol=1e-5)


def test_group_norm_feature_encoder_runs_a_padded_batch_once(monkeypatch):
    # the batched (GPU) route: one pass of the feature encoder's first conv for a batch of three lengths, not one per
    # length (the per-length regrouping ran every utterance alone)
    from merits.modeling_merits import MeritsSpeechEncoder

    monkeypatch.setattr(MeritsSpeechEncoder, "feature_encoder_per_utterance", False)
    model = _group_norm_speech_model()
    first_conv = model.speech_encoder.backbone.feature_extractor.conv_layers[0].conv
    calls = []
    handle = first_conv.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    generator = torch.Generator().manual_seed(2)
    lengths = [4000, 2500, 1300]
    values = torch.zeros(3, 4000)
    mask = torch.zeros(3, 4000, dtype=torch.long)
    for row, length in enumerate(lengths):
        values[row, :length] = torch.randn(length, generator=generator)
        mask[row, :length] = 1
    try:
        with torch.no_grad():
            batched = model.get_utterance_embeddings(input_values=values, audio_attention_mask=mask)["audio"]
        assert len(calls) == 1 and calls[0][0] == 3
        with torch.no_grad():
            for row, length in enumerate(lengths):
                alone = model.get_utterance_embeddings(input_values=values[row : row + 1, :length])["audio"]
                torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()


# ---- the losses without host syncs: masked arithmetic over all rows == the boolean-mask selection they replace ----


def _old_focal_loss(logits, labels, gamma=3.0, mask=None, ignore_index=-100):
    """The formulation before (boolean-mask selection of the valid rows), kept here as the reference."""
    import torch.nn.functional as F

    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    if not valid.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits[valid].float(), labels[valid], reduction="none")
    if gamma:
        ce = (1.0 - torch.exp(-ce)).pow(gamma) * ce
    return ce.mean()


def _old_supcon(text_repr, audio_repr, labels, mask, temperature=1.0, ignore_index=-100):
    import torch.nn.functional as F

    valid = mask.bool() & (labels != ignore_index)
    if not valid.any():
        return (text_repr.sum() + audio_repr.sum()) * 0.0
    features = F.normalize(torch.cat([text_repr[valid], audio_repr[valid]], dim=0).float(), dim=-1)
    similarity = features @ features.t() / temperature
    row_labels = torch.cat([labels[valid], labels[valid]], dim=0)
    not_self = ~torch.eye(similarity.shape[0], dtype=torch.bool)
    similarity = similarity.masked_fill(~not_self, torch.finfo(similarity.dtype).min)
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (row_labels[:, None] == row_labels[None, :]) & not_self
    return -((log_prob * positives).sum(1) / positives.sum(1)).mean()


def _old_symmetric_kl(expert_logits, available, reduction="batchmean"):
    import torch.nn.functional as F

    num_experts = expert_logits.shape[-2]
    conversations = available.reshape(available.shape[0], -1).any(-1).sum().clamp(min=1)
    log_probs = F.log_softmax(expert_logits.float(), dim=-1)
    probs = log_probs.exp()
    total, num_pairs = expert_logits.sum() * 0.0, 0
    for i in range(num_experts):
        for j in range(i + 1, num_experts):
            num_pairs += 1
            both = available[..., i] & available[..., j]
            if not both.any():
                continue
            kl = (probs[..., i, :] * (log_probs[..., i, :] - log_probs[..., j, :])).sum(-1)
            kl = kl + (probs[..., j, :] * (log_probs[..., j, :] - log_probs[..., i, :])).sum(-1)
            total = total + (kl[both].sum() / conversations if reduction == "batchmean" else kl[both].mean())
    return total / num_pairs


def _loss_cases(seed):
    """Masks with edge cases: random, a class absent, a modality absent everywhere, a fully padded conversation,
    a single valid row, nothing valid, everything valid."""
    g = torch.Generator().manual_seed(seed)
    b, t, c = 4, 7, 5
    turn = torch.ones(b, t, dtype=torch.bool)
    turn[1, 4:] = False
    turn[3] = False  # an all-padding conversation
    labels = torch.randint(0, c, (b, t), generator=g).masked_fill(~turn, -100)
    labels[0, 2] = -100  # an unlabelled real turn
    random_mask = (torch.rand(b, t, generator=g) > 0.3) & turn
    one = torch.zeros(b, t, dtype=torch.bool)
    one[2, 3] = True
    no_class_0 = labels.masked_fill(labels == 0, 1)
    return g, c, [
        ("random", labels, random_mask), ("turns", labels, turn), ("class 0 absent", no_class_0, random_mask),
        ("one row", labels, one), ("none", labels, torch.zeros(b, t, dtype=torch.bool)),
        ("all", torch.randint(0, c, (b, t), generator=g), torch.ones(b, t, dtype=torch.bool)),
    ]


def _value_and_grads(function, *tensors, **kwargs):
    tensors = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in tensors]
    value = function(*tensors, **kwargs)
    inputs = [x for x in tensors if x.requires_grad]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _assert_same(new, old, what):
    (new_value, new_grads), (old_value, old_grads) = new, old
    torch.testing.assert_close(new_value.float(), old_value.float(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
    for new_grad, old_grad in zip(new_grads, old_grads):
        torch.testing.assert_close(new_grad, old_grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} (grad): {m}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_losses_equal_the_boolean_selection(seed):
    from merits.modeling_merits import focal_loss, supervised_contrastive_loss, symmetric_kl_loss

    g, c, cases = _loss_cases(seed)
    b, t = cases[0][1].shape
    logits = torch.randn(b, t, c, generator=g) * 3
    logits[3] = float("nan")  # an all-padding row's values must reach neither loss nor gradients
    text, audio = torch.randn(b, t, 6, generator=g), torch.randn(b, t, 6, generator=g)
    experts = torch.randn(b, t, 3, c, generator=g) * 2
    for name, labels, mask in cases:
        clean = logits.nan_to_num(0.0)  # (the selection's "nothing selected" zero is logits.sum() * 0: NaN here)
        for gamma in (0.0, 3.0):
            _assert_same(_value_and_grads(focal_loss, clean, labels, gamma=gamma, mask=mask),
                         _value_and_grads(_old_focal_loss, clean, labels, gamma=gamma, mask=mask), f"focal {name} {gamma}")
        for temperature in (1.0, 0.1):
            _assert_same(_value_and_grads(supervised_contrastive_loss, text, audio, labels, mask, temperature=temperature),
                         _value_and_grads(_old_supcon, text, audio, labels, mask, temperature=temperature), f"supcon {name}")
        # per expert: a random subset, one expert absent everywhere (a modality missing from the batch)
        available = mask.unsqueeze(-1) & (torch.rand(b, t, 3, generator=g) > 0.2)
        absent = mask.unsqueeze(-1).expand(b, t, 3).clone()
        absent[..., 1] = False
        for availability in (available, absent):
            for reduction in ("batchmean", "mean"):
                _assert_same(_value_and_grads(symmetric_kl_loss, experts, availability, reduction=reduction),
                             _value_and_grads(_old_symmetric_kl, experts, availability, reduction=reduction), f"kl {name}")
    # NaN at left-out rows (padding) stays out of the losses and their gradients
    value, (grad,) = _value_and_grads(focal_loss, logits, cases[1][1], mask=cases[1][2])
    assert torch.isfinite(value) and torch.isfinite(grad).all() and grad[3].eq(0).all()
    nan_text = text.clone()
    nan_text[3] = float("nan")
    value, grads = _value_and_grads(supervised_contrastive_loss, nan_text, audio, cases[1][1], cases[1][2])
    assert torch.isfinite(value) and all(torch.isfinite(x).all() and x[3].eq(0).all() for x in grads)


def test_masked_losses_under_bf16_autocast_run_in_float32():
    from merits.modeling_merits import focal_loss, supervised_contrastive_loss, symmetric_kl_loss

    g, c, cases = _loss_cases(3)
    _, labels, mask = cases[0]
    b, t = labels.shape
    logits = (torch.randn(b, t, c, generator=g) * 3).bfloat16()
    text, audio = torch.randn(b, t, 6, generator=g).bfloat16(), torch.randn(b, t, 6, generator=g).bfloat16()
    experts = torch.randn(b, t, 3, c, generator=g).bfloat16()
    available = mask.unsqueeze(-1).expand(b, t, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = [focal_loss(logits, labels, mask=mask), supervised_contrastive_loss(text, audio, labels, mask),
                  symmetric_kl_loss(experts, available)]
    expected = [_old_focal_loss(logits, labels, mask=mask), _old_supcon(text, audio, labels, mask),
                _old_symmetric_kl(experts, available)]
    for value, old in zip(values, expected):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, old.float(), rtol=1e-5, atol=1e-6)


def _count_syncs(function):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.op_counts import StepCounter

    with StepCounter() as counter:
        function()
    return dict(counter.syncs)


def test_losses_make_no_host_sync():
    from merits.modeling_merits import focal_loss, supervised_contrastive_loss, symmetric_kl_loss

    g, c, cases = _loss_cases(4)
    _, labels, mask = cases[0]
    b, t = labels.shape
    logits = torch.randn(b, t, c, generator=g, requires_grad=True)
    text = torch.randn(b, t, 6, generator=g, requires_grad=True)
    experts = torch.randn(b, t, 3, c, generator=g, requires_grad=True)

    def step():
        loss = (focal_loss(logits, labels, mask=mask) + supervised_contrastive_loss(text, text * 2, labels, mask)
                + symmetric_kl_loss(experts, mask.unsqueeze(-1).expand(b, t, 3)))
        loss.backward()

    assert _count_syncs(step) == {}
    # the counter does see the boolean selection the losses used before
    assert _count_syncs(lambda: _old_focal_loss(logits, labels, mask=mask).backward()) != {}


@pytest.mark.parametrize("architecture,stage", [("mister-e", "moe"), ("merits-l", "context"), ("merits-l", "fusion"),
                                                ("merits-l", "context+fusion")])
def test_model_step_equals_the_boolean_selection_losses(monkeypatch, architecture, stage):
    """A whole training step (loss, loss terms, logits, every gradient) with the masked losses equals the one with
    the boolean-mask losses, on a batch with a padded conversation, turns missing a modality and a turn unlabelled."""
    import merits.modeling_merits as modeling
    from tests._tiny import tiny_merits_config

    turn_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    text_mask = turn_mask.clone()
    text_mask[0, 1] = 0
    audio_mask = turn_mask.clone()
    audio_mask[2, 0] = audio_mask[0, 3] = 0
    labels = torch.tensor([[0, 1, 2, 1, 0], [2, 0, -100, -100, -100], [1, 1, 0, -100, -100]])
    def run():
        torch.manual_seed(0)
        model = modeling.MeritsForConversationClassification(tiny_merits_config(architecture)).train()
        config = model.config
        text = torch.randn(3, 5, config.text_embed_dim, generator=torch.Generator().manual_seed(1))
        audio = torch.randn(3, 5, config.audio_embed_dim, generator=torch.Generator().manual_seed(2))
        out = model(text_embeds=text, audio_embeds=audio, turn_mask=turn_mask, text_mask=text_mask,
                    audio_mask=audio_mask, labels=labels, stage=stage)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    new, new_grads = run()
    monkeypatch.setattr(modeling, "focal_loss", _old_focal_loss)
    monkeypatch.setattr(modeling, "supervised_contrastive_loss", _old_supcon)
    monkeypatch.setattr(modeling, "symmetric_kl_loss", _old_symmetric_kl)
    old, old_grads = run()
    torch.testing.assert_close(new.loss, old.loss, rtol=1e-5, atol=1e-6)
    assert set(new.loss_terms) == set(old.loss_terms)
    for name in old.loss_terms:
        torch.testing.assert_close(new.loss_terms[name], old.loss_terms[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(new.logits, old.logits)
    assert new_grads.keys() == old_grads.keys() and new_grads
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(params=[False, True], ids=["masks-on-device", "host-copy"])
def host_route(request, monkeypatch):
    # True: the route taken on a GPU (the masks read back once, checked and planned on the host copy)
    from merits.modeling_merits import MeritsTurnPlan

    monkeypatch.setattr(MeritsTurnPlan, "host_bookkeeping", request.param)
    return request.param


@pytest.mark.parametrize("case,message", [
    ("gap", "conversation 1 has a real turn 2 after a padded turn 1"),
    ("no input", "`audio_mask` says conversation 0, turn 1 has audio, but no audio input was given"),
    ("empty", "Conversation 1, turn 0 is a real turn with neither text nor audio"),
])
def test_mask_checks_raise_the_same_on_the_host_copy(host_route, case, message):
    from merits import MeritsForConversationClassification
    from tests._tiny import tiny_merits_config

    model = MeritsForConversationClassification(tiny_merits_config("mister-e")).eval()
    turn_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    text = torch.randn(2, 3, model.config.text_embed_dim)
    audio = torch.randn(2, 3, model.config.audio_embed_dim)
    kwargs = dict(text_embeds=text, audio_embeds=audio, turn_mask=turn_mask)
    if case == "gap":
        kwargs["turn_mask"] = torch.tensor([[1, 1, 1], [1, 0, 1]])
    elif case == "no input":
        del kwargs["audio_embeds"]
        kwargs["audio_mask"] = torch.tensor([[0, 1, 0], [0, 0, 0]])
    else:
        kwargs["text_mask"] = torch.tensor([[1, 1, 1], [0, 1, 0]])
        kwargs["audio_mask"] = torch.tensor([[1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match=message.replace("`", ".")):
        model(**kwargs)


@pytest.mark.parametrize("architecture,stage", [("mister-e", "moe"), ("merits-l", "context"), ("merits-l", "fusion")])
def test_training_step_reads_the_masks_back_once_on_the_gpu_route(architecture, stage):
    """On the GPU route a training step makes ONE host-device sync (the masks' read-back for their checks and the
    turn plan), none in the losses; outputs equal the CPU route's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.op_counts import StepCounter, gpu_route
    from merits import MeritsForConversationClassification
    from tests._tiny import tiny_merits_config

    turn_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    audio_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    labels = torch.tensor([[0, 1, 2, -100], [2, 0, -100, -100], [-100] * 4])

    def step(count):
        torch.manual_seed(0)
        model = MeritsForConversationClassification(tiny_merits_config(architecture)).train()
        g = torch.Generator().manual_seed(1)
        text = torch.randn(3, 4, model.config.text_embed_dim, generator=g)
        audio = torch.randn(3, 4, model.config.audio_embed_dim, generator=g)
        with count() as counter:
            out = model(text_embeds=text, audio_embeds=audio, turn_mask=turn_mask, audio_mask=audio_mask,
                        labels=labels, stage=stage)
            out.loss.backward()
        return out, [p.grad for p in model.parameters() if p.grad is not None], counter

    with gpu_route("host"):
        out, grads, counter = step(StepCounter)
    assert dict(counter.syncs) == {"cpu": 1}
    with gpu_route("device"):
        _, _, before = step(StepCounter)
    assert sum(before.syncs.values()) > 1  # the counter sees the device route's reads
    plain, plain_grads, _ = step(lambda: __import__("contextlib").nullcontext())
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.loss, plain.loss)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad)


def test_utterance_stage_scatters_without_reading_the_device_on_the_gpu_route():
    """Stage I with raw inputs: the utterances' rows go to their turns by the host copy's indices (no boolean-mask
    assignment, whose size the host would read, forward and backward); outputs and gradients as on the CPU route."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.op_counts import StepCounter, gpu_route
    from merits import MeritsForConversationClassification
    from tests._tiny import tiny_merits_config, tiny_roberta_config, tiny_wavlm_config

    turn_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([[0, 1, 2], [2, 0, -100]])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (5, 7), generator=g)
    attention = torch.ones(5, 7, dtype=torch.long)
    attention[1, 5:] = 0
    wav = torch.randn(5, 1600, generator=g)

    def step(route):
        torch.manual_seed(0)
        model = MeritsForConversationClassification(tiny_merits_config(
            "merits-l", text_config=tiny_roberta_config(), text_embed_dim=None, audio_config=tiny_wavlm_config(),
            audio_embed_dim=None)).train()
        with route() as counter:
            out = model(input_ids=ids, attention_mask=attention, input_values=wav, turn_mask=turn_mask, labels=labels,
                        stage="utterance")
            out.loss.backward()
        return out, [p.grad for p in model.parameters() if p.grad is not None], counter

    with gpu_route("host"):
        out, grads, host = step(StepCounter)
    with gpu_route("device"):
        _, _, device = step(StepCounter)
    plain, plain_grads, _ = step(lambda: __import__("contextlib").nullcontext())
    # the backbones' own reads are on both sides; ours: 2 mask checks + 4 scatters (a size read and a boolean
    # assignment each) + 2 boolean-assignment backwards on the device route, the one read-back on the host route
    assert host.syncs["cpu"] == 1
    assert sum(device.syncs.values()) - sum(host.syncs.values()) == 11
    torch.testing.assert_close(out.logits, plain.logits)
    torch.testing.assert_close(out.loss, plain.loss)
    for grad, plain_grad in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain_grad)


def test_scatter_and_flatten_by_index_equal_the_boolean_mask():
    from merits import MeritsForConversationClassification
    from merits.modeling_merits import scatter_turns
    from tests._tiny import tiny_merits_config

    turn_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    index = turn_mask.nonzero(as_tuple=True)
    flat = torch.randn(6, 3, 2)
    torch.testing.assert_close(scatter_turns(flat, turn_mask, index), scatter_turns(flat, turn_mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="Got 5 utterances but `turn_mask` has 6 real turns"):
        scatter_turns(flat[:5], turn_mask, index)
    model = MeritsForConversationClassification(tiny_merits_config("merits-l"))
    features = torch.randn(3, 4, 7)
    torch.testing.assert_close(model._flatten_audio_features(features, turn_mask, index),
                               model._flatten_audio_features(features, turn_mask), rtol=0, atol=0)
