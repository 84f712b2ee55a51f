"""Run a script (train.py) in CPU gloo processes under Accelerate's FSDP or DeepSpeed state: a test harness.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/cpu_sharded_launch.py train.py --output_dir OUT ...

``accelerate launch`` with fsdp.yaml (or deepspeed_zero2.yaml) starts the processes with ACCELERATE_USE_FSDP and the
FSDP_* variables (ACCELERATE_USE_DEEPSPEED and ACCELERATE_DEEPSPEED_*) as on a GPU machine, but inside them
Accelerate (1.x) takes FSDP and DeepSpeed only for an accelerator's distributed types: ``PartialState`` finds no GPU
and falls back to ``DistributedType.NO`` (N unrelated single-process runs), or with ``cpu=True`` (merits' choice on a
CPU-only machine) to gloo DDP. This wrapper changes that classification and nothing else: the processes' state
says ``MULTI_GPU`` on the gloo backend and the CPU device (``ACCELERATE_TORCH_DEVICE=cpu``), so ``AcceleratorState``
turns it into FSDP (or DeepSpeed) from the launcher's variables, and the script runs Accelerate's real FSDP2 code:
the plugin read from the environment, ``fully_shard`` per transformer layer in ``prepare``, the optimizer switched
to the sharded parameters, ``clip_grad_norm_`` on DTensors, ``get_state_dict`` gathering the full state dict,
``save_state``. torch's FSDP2 runs on CPU tensors with gloo (all-gather, reduce-scatter).

merits' ``cpu_only()`` is made to answer False in these processes (it asks Accelerate for gloo DDP when there is no
accelerator); the patched state then decides, as it would on GPUs.
"""

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: tests/cpu_sharded_launch.py SCRIPT [ARGS...]  (under accelerate launch or torchrun)")
    if "LOCAL_RANK" not in os.environ:
        sys.exit("tests/cpu_sharded_launch.py: start it with accelerate launch or torchrun (no LOCAL_RANK set)")
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"  # PartialState.set_device keeps this device

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, kind = original(self, True, sagemaker_dp, backend)  # what --cpu gives: gloo, MULTI_CPU
        return backend, (DistributedType.MULTI_GPU if kind == DistributedType.MULTI_CPU else kind)

    PartialState._prepare_backend = prepare_backend

    import merits.training.loop as loop

    loop.cpu_only = lambda: False

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
