"""Device paths: the two GRU recurrence routes, bf16 mixed precision, and the model on MERITS_TEST_DEVICE.

These tests run on CPU in CI; `bench/device_check.sh` runs them again with MERITS_TEST_DEVICE=cuda on a GPU, where the
"cudnn" route really is cuDNN and autocast is CUDA's."""

import os

import pytest
import torch

from merits.configuration_merits import MeritsConfig
from merits.modeling_merits import (
    MeritsForConversationClassification,
    MeritsTurnPlan,
    resolve_recurrence,
    run_packed_gru,
)
from tests._tiny import tiny_merits_config


DEVICE = torch.device(os.environ.get("MERITS_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("MERITS_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)

if DEVICE.type == "cuda":  # float32 means float32: cuDNN's GRU and convolutions would otherwise use TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# float64 on CPU (exact comparisons); float32 on GPUs (cuDNN has no float64 GRU speed path; tolerances widened)
DTYPE = torch.float64 if DEVICE.type == "cpu" else torch.float32
TOL = dict(rtol=1e-7, atol=1e-9) if DTYPE == torch.float64 else dict(rtol=2e-4, atol=2e-5)
TURN_MASK = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


def test_auto_recurrence_is_chosen_by_device():
    assert resolve_recurrence("auto", torch.device("cpu")) == "loop"
    assert resolve_recurrence("auto", torch.device("cuda")) == "cudnn"
    assert resolve_recurrence("auto", "meta") == "cudnn"
    assert resolve_recurrence("loop", torch.device("cuda")) == "loop"
    with pytest.raises(ValueError, match="recurrence"):
        resolve_recurrence("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="Unknown recurrence 'fast'"):
        MeritsConfig(recurrence="fast")
    assert tiny_merits_config().recurrence == "auto"


@pytest.mark.parametrize("bidirectional,num_layers", [(True, 2), (False, 3), (True, 1)])
def test_recurrence_routes_give_the_same_outputs_and_gradients(bidirectional, num_layers):
    torch.manual_seed(0)
    gru = torch.nn.GRU(5, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    gru = gru.to(DEVICE, DTYPE)
    turn_mask = TURN_MASK.to(DEVICE)
    x = torch.randn(4, 6, 5, dtype=DTYPE, device=DEVICE, requires_grad=True)
    plan = MeritsTurnPlan(turn_mask)
    loop = run_packed_gru(gru, plan.gather(x), plan, "loop")
    cudnn = run_packed_gru(gru, plan.gather(x), plan, "cudnn")
    assert cudnn.shape == loop.shape == (int(turn_mask.sum()), 4 * (2 if bidirectional else 1))
    torch.testing.assert_close(cudnn, loop, **TOL)
    weights = torch.randn_like(loop)
    parameters = [x, *gru.parameters()]
    grads_loop = torch.autograd.grad((loop * weights).sum(), parameters)
    grads_cudnn = torch.autograd.grad((cudnn * weights).sum(), parameters)
    names = ["x", *(name for name, _ in gru.named_parameters())]
    for name, got, want in zip(names, grads_cudnn, grads_loop):
        torch.testing.assert_close(got, want, msg=name, **TOL)
    # a padded turn's input never reaches a real turn on either route
    assert grads_cudnn[0][~turn_mask.bool()].abs().max() == 0


def test_recurrence_routes_handle_an_empty_batch():
    gru = torch.nn.GRU(5, 4, bidirectional=True, batch_first=True).to(DEVICE, DTYPE)
    plan = MeritsTurnPlan(torch.zeros(2, 3, dtype=torch.long, device=DEVICE))
    for route in ("loop", "cudnn"):
        assert run_packed_gru(gru, torch.zeros(0, 5, dtype=DTYPE, device=DEVICE), plan, route).shape == (0, 8)


def _batch(architecture, seed=0):
    generator = torch.Generator().manual_seed(seed)
    b, t = TURN_MASK.shape
    text = torch.randn(b, t, 12, generator=generator)
    audio = torch.randn(b, t, 10, generator=generator)
    labels = torch.randint(0, 3, (b, t), generator=generator).masked_fill(~TURN_MASK.bool(), -100)
    return dict(text_embeds=text, audio_embeds=audio, turn_mask=TURN_MASK.clone(), labels=labels)


def _model(architecture, recurrence, **kwargs):
    torch.manual_seed(0)
    config = tiny_merits_config(architecture, recurrence=recurrence, **kwargs)
    return MeritsForConversationClassification(config).to(DEVICE, DTYPE).train()


@pytest.mark.parametrize("architecture,stage", [("mister-e", None), ("merits-l", "context")])
def test_model_routes_share_checkpoints_and_agree(architecture, stage):
    loop = _model(architecture, "loop")
    cudnn = _model(architecture, "cudnn")
    assert loop.state_dict().keys() == cudnn.state_dict().keys()
    cudnn.load_state_dict(loop.state_dict())
    for module in (loop, cudnn):
        for m in module.modules():  # dropout off: the two forwards must see the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    batch = {k: (v.to(DEVICE, DTYPE) if v.is_floating_point() else v.to(DEVICE)) for k, v in _batch(architecture).items()}
    kwargs = {} if stage is None else {"stage": stage}
    out_loop = loop(**batch, **kwargs)
    out_cudnn = cudnn(**batch, **kwargs)
    torch.testing.assert_close(out_cudnn.logits, out_loop.logits, **TOL)
    torch.testing.assert_close(out_cudnn.loss, out_loop.loss, **TOL)
    out_loop.loss.backward()
    out_cudnn.loss.backward()
    for (name, p_loop), (_, p_cudnn) in zip(loop.named_parameters(), cudnn.named_parameters()):
        if p_loop.grad is None:
            assert p_cudnn.grad is None, name
            continue
        torch.testing.assert_close(p_cudnn.grad, p_loop.grad, msg=name, **TOL)


@pytest.mark.parametrize("architecture,stage", [("mister-e", None), ("merits-l", "context")])
def test_bf16_autocast_keeps_losses_and_gate_in_float32(architecture, stage):
    model = _model(architecture, "auto").float()
    batch = {k: v.to(DEVICE) for k, v in _batch(architecture).items()}
    kwargs = {} if stage is None else {"stage": stage}
    model.eval()
    with torch.no_grad():
        reference = model(**batch, **kwargs)
        with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
            mixed = model(**batch, **kwargs)
    assert mixed.loss.dtype == torch.float32
    assert torch.isfinite(mixed.loss)
    # bf16 keeps ~3 significant digits: the loss within 2 %, the logits within a few hundredths of their scale
    torch.testing.assert_close(mixed.loss, reference.loss, rtol=2e-2, atol=2e-2)
    scale = reference.logits.abs().max()
    assert (mixed.logits.float() - reference.logits).abs().max() <= 0.05 * scale + 1e-3
    if architecture == "mister-e":
        assert mixed.gate_weights.dtype == torch.float32
        torch.testing.assert_close(mixed.gate_weights.sum(-1)[TURN_MASK.bool().to(DEVICE)],
                                   torch.ones(int(TURN_MASK.sum()), device=DEVICE))
    # training under autocast: gradients reach every trained parameter and are finite
    model.train()
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        loss = model(**batch, **kwargs).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_turn_plan_on_device_equals_the_cpu_plan():
    # on a GPU the plan's bookkeeping runs on the host (one read of the mask) and is copied over: same indices
    from merits.modeling_merits import MeritsTurnPlan

    turn_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cpu = MeritsTurnPlan(turn_mask, gap=2)
    there = MeritsTurnPlan(turn_mask.to(DEVICE), gap=2)
    for name, value in cpu.__dict__.items():
        other = getattr(there, name)
        if isinstance(value, torch.Tensor):
            assert other.device.type == DEVICE.type and torch.equal(other.cpu(), value), name
        else:
            assert other == value, name
