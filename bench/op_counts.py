"""Per-training-step operator and host-sync counts, ours vs the reference, on any device (a CPU here).

A GPU step this small (the H200 device check: MoE 0.11 s, stage II 0.03 s) is bound by kernel launches and
host-device round trips rather than FLOPs, and both are device-independent properties of the code: this counts,
for ONE training step of each `bench/device_check.py` variant (the same models, batches and optimisers; the
paper-size shapes of 8 conversations of 20-80 turns, with small widths since counts do not depend on them):

- `ops`: ATen operators dispatched (each is at least one kernel launch on a GPU; forward, backward, optimiser);
- `syncs`: operations that make the host wait for the device: `_local_scalar_dense` (`.item()`, `int()`, `bool()`,
  `if tensor.any()`), `nonzero`, `masked_select`, indexing with a boolean mask, and `.tolist()` / `.cpu()` /
  `.numpy()` calls (wrapped here, as on a CPU they dispatch nothing);
- `host_reads` (not syncs, listed apart): reads of tensors that live on the host on a GPU too: `nn.GRU` reading a
  `PackedSequence`'s `batch_sizes` (PyTorch keeps them on the CPU on every device). Work on the model's host copy of
  the masks (`MeritsTurnPlan`'s bookkeeping, `_check_masks`' checks) is not counted at all: it is CPU work there.

Our model runs with `recurrence="cudnn"` (the route `auto` takes on a GPU). Usage:
`python bench/op_counts.py [--plan host|device] [--record]` (--record stores the entry `step_op_counts_plan_<plan>`
in bench/results.json; `--plan device` counts the turn plan and the mask checks computed on the device, as before
they moved to one host copy of the masks on GPUs). `gpu_route()` sets up the same counting for tests.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.is_nonzero")


PAUSED = [0]  # > 0 inside a call that counts as one device op (a GRU) or is not device work (the optimiser)
IN_PACKED_GRU = [0]  # > 0 inside nn.GRU.forward on a PackedSequence: its scalar reads are of the host batch_sizes


def count_as_one(function, label):
    """Wrap `function` so that its inner ops are not counted and the call counts as one op named `label`."""

    def wrapped(*args, **kwargs):
        if PAUSED[0] == 0 and StepCounter.active is not None and label:
            StepCounter.active.ops += 1
            StepCounter.active.calls[label] += 1
        PAUSED[0] += 1
        try:
            return function(*args, **kwargs)
        finally:
            PAUSED[0] -= 1

    return wrapped


class StepCounter:
    """Counts ATen ops and host syncs while active (a TorchDispatchMode plus wrapped Tensor methods).

    On a CPU `nn.GRU` decomposes into per-time-step ATen ops that cuDNN runs as one call per layer on a GPU, so a
    `torch._VF.gru` call counts as one op; the optimiser step is not counted (on a GPU Adam's step counters live on
    the host, and it is the same for both sides)."""

    active = None

    def __init__(self):
        self.ops = 0
        self.syncs = collections.Counter()
        self.host_reads = 0
        self.calls = collections.Counter()

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if PAUSED[0]:
                    return func(*args, **(kwargs or {}))
                counter.ops += 1
                name = str(func.overloadpacket)
                if name == "aten._local_scalar_dense" and IN_PACKED_GRU[0]:
                    counter.host_reads += 1
                elif name.startswith(SYNC_OPS) and any(getattr(a, "_merits_host_copy", False) for a in args):
                    pass  # the model's own host copy of the masks: CPU work on a GPU machine
                elif name.startswith(SYNC_OPS):
                    counter.syncs[name.replace("aten.", "")] += 1
                elif name in ("aten.index", "aten.index_put", "aten.index_put_") and len(args) > 1:
                    if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                        counter.syncs["bool_index"] += 1
                return func(*args, **(kwargs or {}))

        self._saved = {}
        for method in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapped(tensor, *a, _original=original, _method=method, **k):
                if not PAUSED[0]:
                    counter.syncs[_method] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapped)
        self._mode = Mode()
        self._mode.__enter__()
        StepCounter.active = self
        return self

    def __exit__(self, *exc):
        import torch

        StepCounter.active = None
        self._mode.__exit__(*exc)
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return False


def count_variants(figures, variants, batches, device, size, budget, reserve) -> None:
    """`device_check._run_variants`' signature: one warm-up step, then count one step per batch (mean)."""
    from bench.device_check import _cycle_step

    for name, build in variants:
        if "bf16" in name or "cudnn_disabled" in name:
            continue  # autocast adds casts only; cuDNN on/off is the same ATen op count on a CPU
        step = _cycle_step(batches, build())
        step()
        ops, host_reads, syncs, calls = 0, 0, collections.Counter(), collections.Counter()
        for _ in range(len(batches)):
            with StepCounter() as counter:
                step()
            ops += counter.ops
            host_reads += counter.host_reads
            syncs.update(counter.syncs)
            calls.update(counter.calls)
        figures[f"{name}/ops_per_step"] = ops / len(batches)
        figures[f"{name}/syncs_per_step"] = sum(syncs.values()) / len(batches)
        figures[f"{name}/syncs_by_kind"] = ", ".join(f"{k} {v / len(batches):g}" for k, v in sorted(syncs.items()))
        figures[f"{name}/host_reads_per_step"] = host_reads / len(batches)
        figures[f"{name}/gru_calls_per_step"] = calls["gru"] / len(batches)


@contextlib.contextmanager
def gpu_route(plan: str = "host"):
    """Count as on a GPU, on a CPU: `MeritsTurnPlan`'s bookkeeping on the host (`plan="host"`, as on GPUs now) or on
    the device (`"device"`, as before); the model's host-side work (its plan and mask checks on the host copy) not
    counted; a `torch._VF.gru` call as one op; the optimiser step not counted; `nn.GRU`'s reads of a PackedSequence's
    `batch_sizes` as host reads. Everything is restored on exit."""
    import torch

    from merits.modeling_merits import MeritsForConversationClassification, MeritsTurnPlan

    saved = [(MeritsTurnPlan, "host_bookkeeping"), (MeritsTurnPlan, "__init__"),
             (MeritsForConversationClassification, "_check_masks"), (torch.nn.GRU, "forward"), (torch._VF, "gru"),
             (torch.optim.Adam, "step"), (torch.optim.AdamW, "step")]
    saved = [(owner, name, owner.__dict__.get(name, getattr(owner, name))) for owner, name in saved]
    MeritsTurnPlan.host_bookkeeping = plan == "host"
    plan_init = MeritsTurnPlan.__init__

    def counted_plan_init(self, turn_mask, gap=0, host_mask=None):
        if getattr(turn_mask, "_merits_host_copy", False):  # the host-side bookkeeping: CPU work on a GPU machine
            return count_as_one(plan_init, None)(self, turn_mask, gap, host_mask)
        return plan_init(self, turn_mask, gap, host_mask)

    MeritsTurnPlan.__init__ = counted_plan_init  # (its ~10 host-to-device index copies are not counted as ops)
    check_masks = MeritsForConversationClassification._check_masks

    def counted_check_masks(self, turn_mask, *rest):
        if getattr(turn_mask, "_merits_host_copy", False):  # the checks on the host copy of the masks: CPU work
            return count_as_one(check_masks, None)(self, turn_mask, *rest)
        return check_masks(self, turn_mask, *rest)

    MeritsForConversationClassification._check_masks = counted_check_masks
    gru_forward = torch.nn.GRU.forward

    def counted_gru_forward(self, input, hx=None):
        packed = isinstance(input, torch.nn.utils.rnn.PackedSequence)
        IN_PACKED_GRU[0] += packed
        try:
            return gru_forward(self, input, hx)
        finally:
            IN_PACKED_GRU[0] -= packed

    torch.nn.GRU.forward = counted_gru_forward
    torch._VF.gru = count_as_one(torch._VF.gru, "gru")
    for optimizer in (torch.optim.Adam, torch.optim.AdamW):
        optimizer.step = count_as_one(optimizer.step, None)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _count_all() -> dict:
    import torch

    from bench.device_check import Budget, section_merits_l_steps, section_moe_step, sizes

    size = dict(sizes(False), dim=64, hidden=32, fusion_dim=32, batches=2, recurrence="cudnn")
    device = torch.device("cpu")
    figures: dict = {}
    moe: dict = {}
    section_moe_step(moe, device, size, Budget(1e9), run_variants=count_variants)
    merits_l: dict = {}
    section_merits_l_steps(merits_l, device, size, Budget(1e9), run_variants=count_variants)
    figures.update({f"moe_step/{k}": v for k, v in moe.items() if "/" in k and "speedup" not in k})
    figures.update({f"merits_l_steps/{k}": v for k, v in merits_l.items() if "speedup" not in k})
    figures["real_turns_per_batch"] = ",".join(str(t) for t in moe["real_turns_per_batch"])
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="store the entry step_op_counts in bench/results.json")
    parser.add_argument("--plan", choices=("host", "device"), default="host",
                        help="MeritsTurnPlan bookkeeping and the mask checks as on a GPU now (host: one read of the "
                             "masks per forward) or as before (device: computed on the device, one host read per "
                             "int()/nonzero/tolist/.any())")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with gpu_route(args.plan):
        figures = _count_all()
    for key, value in figures.items():
        print(f"{key}: {value}")
    if args.record:
        sys.path.insert(0, str(REPO / "bench"))
        from common import record

        record(f"step_op_counts_plan_{args.plan}", figures, notes="one training step per variant, counted on a CPU with the GPU route "
               "(recurrence=cudnn); ops = ATen operators dispatched, syncs = host reads of device values, host_reads = "
               "reads of host tensors (a PackedSequence's batch_sizes), not syncs")
    return figures


if __name__ == "__main__":
    main()
