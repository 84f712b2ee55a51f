"""One-command device check: the GPU path's correctness and speed, written as ONE JSON of figures.

    bash bench/device_check.sh                # on a CUDA machine: paper sizes, under 8 minutes on one H200
    bash bench/device_check.sh --cpu-smoke    # anywhere: the same code paths at tiny sizes on CPU (< 3 minutes)

Sections (each in try/except: a failure is recorded under its "error" and the next section runs; the JSON is
rewritten after every section, so a run cut short still leaves every finished section on disk; a global time
budget, `--budget_seconds`, shortens or skips what would not fit):

- `environment`: versions, the device, cuDNN, whether bf16 is supported.
- `matmul_peak`: the bf16 matrix peak of this device, measured: an 8192^3 `torch.mm` in bfloat16 (3 warm-ups,
  10 timed; CUDA events), in TFLOP/s. The extraction figures are fractions of it.
- `model_tests`: `pytest tests/test_device.py` in a subprocess with MERITS_TEST_DEVICE=cuda (the two GRU routes,
  checkpoints shared, bf16 autocast keeping the losses and the gate in float32, on the GPU itself), then
  `tests/test_modeling.py` on this machine's library versions; each with a timeout.
- `moe_step`: the MiSTER-E MoE training step at paper size (2048-d inputs, GRU 512, fusion 1024 x 4 blocks, Adam,
  clip 1.0; 8 conversations of 20-80 turns, the SAME batches for every implementation), ours vs
  `bench/reference/mister_e.py` (the official `AttentionMoE`'s computation), in float32 and under bf16 autocast;
  ours also with `recurrence="loop"` (the CPU route) in float32, the reference also with cuDNN disabled as the
  official `train_moe.py` runs it (`torch.backends.cudnn.enabled = False`).
- `merits_l_steps`: MERITS-L stage II (both Bi-GRU + self-attention context encoders) and stage III (co-attention
  fusion on exported stage II features; the reference recomputes its frozen GRUs every step, as it does) steps,
  ours vs `bench/reference/merits_l.py`, float32 and bf16 autocast.
- `extraction`: utterance-embedding throughput of RoBERTa-large and WavLM-base-plus sized backbones (random
  weights, bfloat16 weights, `get_utterance_embeddings` under `torch.inference_mode`, length-sorted batches) as
  utterances/s, achieved TFLOP/s (real tokens/frames only, bench/bench_extraction.py's analytic counts) and the
  fraction of the measured bf16 matmul peak.

Timing: warm-up steps first, then `torch.cuda.synchronize()` around every timed step (a step's host work and its
kernels both count) and the median and mean of the step times. Steps are per batch; utterances/s counts real turns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NUM_CLASSES = 6


# ------------------------------------------------------------------------------------------------------ plumbing


class Budget:
    """The global time budget: sections ask how much is left and stop their loops in time."""

    def __init__(self, seconds: float):
        self.start = time.monotonic()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)


class Report:
    """The one JSON of figures, rewritten (atomically) after every section."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, function, *args) -> None:
        started = time.monotonic()
        figures: dict = {}
        try:
            function(figures, *args)
        except Exception as error:  # noqa: BLE001 - recorded, the next section runs
            figures["error"] = f"{type(error).__name__}: {error}"
            figures["traceback"] = traceback.format_exc()[-4000:]
            print(f"[device_check] {name} FAILED: {figures['error']}", file=sys.stderr, flush=True)
        figures["section_seconds"] = round(time.monotonic() - started, 2)
        self.data["sections"][name] = figures
        self.write()
        print(f"[device_check] {name} done in {figures['section_seconds']} s", file=sys.stderr, flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, warmup: int, steps: int, deadline: float) -> dict:
    """Run `step()` `warmup` times, then up to `steps` timed times (stopping at `deadline`, a time.monotonic())."""
    import statistics

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        if times and time.monotonic() > deadline:
            break
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_seconds": statistics.median(times), "mean_seconds": sum(times) / len(times), "steps": len(times)}


# ------------------------------------------------------------------------------------------------------ sizes


def sizes(smoke: bool) -> dict:
    if smoke:
        return dict(dim=32, hidden=16, fusion_dim=24, batch=3, min_turns=3, max_turns=9, batches=2, warmup=1, steps=2,
                    matmul=256, text_utterances=16, text_batch=8, speech_utterances=4, speech_batch=2, max_seconds=1.0)
    return dict(dim=2048, hidden=512, fusion_dim=1024, batch=8, min_turns=20, max_turns=80, batches=4, warmup=3,
                steps=12, matmul=8192, text_utterances=2048, text_batch=256, speech_utterances=192, speech_batch=32,
                max_seconds=8.0)


def conversation_batches(size: dict, seed: int = 0):
    """`size["batches"]` batches of `size["batch"]` conversations of 20-80 turns (uniform), 2048-d text and speech
    embeddings, 6 labels: as padded tensors (the reference's input, labels -1 at pads) and our inputs (-100)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(size["batches"]):
        lengths = torch.randint(size["min_turns"], size["max_turns"] + 1, (size["batch"],), generator=generator)
        longest = int(lengths.max())
        turn_mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        text = torch.randn(size["batch"], longest, size["dim"], generator=generator) * turn_mask.unsqueeze(-1)
        audio = torch.randn(size["batch"], longest, size["dim"], generator=generator) * turn_mask.unsqueeze(-1)
        labels = torch.randint(0, NUM_CLASSES, (size["batch"], longest), generator=generator)
        out.append({"text": text, "audio": audio, "turn_mask": turn_mask, "real_turns": int(lengths.sum()),
                    "labels_ours": labels.masked_fill(~turn_mask, -100), "labels_reference": labels.masked_fill(~turn_mask, -1)})
    return out


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


def _cycle_step(batches, run_one):
    state = {"i": 0}

    def step():
        run_one(batches[state["i"] % len(batches)])
        state["i"] += 1

    return step


def _utterances_per_second(timing: dict, batches) -> float:
    mean_turns = sum(b["real_turns"] for b in batches) / len(batches)
    return mean_turns / timing["mean_seconds"]


# ------------------------------------------------------------------------------------------------------ sections


def section_environment(figures: dict, device) -> None:
    import torch
    import transformers

    figures.update(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                   device=str(device), cuda_available=torch.cuda.is_available(), machine=platform.machine(),
                   cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        import accelerate

        figures["accelerate"] = accelerate.__version__
    except Exception as error:  # noqa: BLE001
        figures["accelerate"] = f"not importable: {error}"
    if device.type == "cuda":
        figures.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                       gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))


def section_matmul_peak(figures: dict, device, size: dict, budget: Budget) -> None:
    import torch

    n = size["matmul"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    timing = time_steps(lambda: torch.mm(a, b), device, 3, 10, time.monotonic() + min(60.0, max(budget.left(), 1.0)))
    figures.update(shape=[n, n, n], dtype="bfloat16", steps=timing["steps"],
                   tflops_per_second=2 * n**3 / timing["median_seconds"] / 1e12)
    if device.type == "cuda":
        # CUDA-event timing of 10 back-to-back products (no host gap between them)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            torch.mm(a, b)
        end.record()
        torch.cuda.synchronize(device)
        figures["tflops_per_second_events"] = 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12


def section_model_tests(figures: dict, device, smoke: bool, budget: Budget, host: bool = False) -> None:
    """pytest in a subprocess: tests/test_device.py on `device` (MERITS_TEST_DEVICE); with `host`, the model tests
    (tests/test_modeling.py, CPU) on this machine's library versions, in whatever time the budget has left."""
    if host:
        runs = [("test_modeling_host", ["tests/test_modeling.py", "-x"] + (["-k", "packed_gru"] if smoke else []), {},
                 max(0.0, budget.left() - 10))]
    elif smoke:
        runs = [("test_device", ["tests/test_device.py", "-k", "auto_recurrence"], {"MERITS_TEST_DEVICE": "cpu"}, 90)]
    else:
        runs = [("test_device", ["tests/test_device.py"], {"MERITS_TEST_DEVICE": device.type}, 120)]
    for name, args, env_extra, limit in runs:
        timeout = min(limit, budget.left() - (30 if smoke else 10 if host else 240))
        if timeout < 20:
            figures[f"{name}/skipped"] = "not enough time left in the budget"
            continue
        env = dict(os.environ, PYTHONUNBUFFERED="1", **env_extra)
        if smoke:
            env["OMP_NUM_THREADS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            output, rc = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or "") if isinstance(expired.stdout, str) else (expired.stdout or b"").decode()
            rc = "timeout"
        lines = [line for line in output.strip().splitlines() if line.strip()]
        summary = lines[-1] if lines else ""
        figures[f"{name}/returncode"] = rc
        figures[f"{name}/summary"] = summary
        figures[f"{name}/seconds"] = round(time.monotonic() - started, 1)
        figures[f"{name}/env"] = env_extra
        if rc != 0:
            figures[f"{name}/output_tail"] = "\n".join(lines[-60:])


def _our_moe_model(size: dict, recurrence: str):
    from merits import MeritsConfig, MeritsForConversationClassification

    config = MeritsConfig(architecture="mister-e", text_embed_dim=size["dim"], audio_embed_dim=size["dim"],
                          context_text_hidden_size=size["hidden"], context_audio_hidden_size=size["hidden"],
                          context_conv_channels=2 * size["hidden"], fusion_hidden_size=size["fusion_dim"],
                          id2label={i: f"class_{i}" for i in range(NUM_CLASSES)}, stage="moe", recurrence=recurrence)
    model = MeritsForConversationClassification(config)
    model.freeze_for_stage("moe")
    return model


def _autocast(device, enabled: bool):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def section_moe_step(figures: dict, device, size: dict, budget: Budget, run_variants=None) -> None:
    import torch

    from bench.reference import mister_e as ref

    batches = [_to(b, device) for b in conversation_batches(size)]
    figures["real_turns_per_batch"] = [b["real_turns"] for b in batches]
    figures["padded_per_real_turn"] = sum(b["turn_mask"].numel() for b in batches) / sum(b["real_turns"] for b in batches)

    def ours(recurrence: str, bf16: bool):
        torch.manual_seed(0)
        model = _our_moe_model(size, recurrence).to(device).train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def run_one(b):
            with _autocast(device, bf16):
                loss = model(text_embeds=b["text"], audio_embeds=b["audio"], turn_mask=b["turn_mask"],
                             labels=b["labels_ours"], stage="moe").loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

        return run_one

    def reference(bf16: bool, cudnn: bool = True):
        torch.manual_seed(0)
        model = ref.ReferenceAttentionMoE(size["dim"], NUM_CLASSES, hidden_dim=size["hidden"],
                                          fusion_dim=size["fusion_dim"]).to(device)
        optimizer = ref.make_optimizer(model)

        def run_one(b):
            with torch.backends.cudnn.flags(enabled=cudnn), _autocast(device, bf16):
                ref.train_step(model, optimizer, b["audio"], b["text"], b["labels_reference"])

        return run_one

    auto = size.get("recurrence", "auto")  # bench/op_counts.py counts the GPU route ("cudnn") on a CPU
    variants = [("ours/fp32", lambda: ours(auto, False)), ("reference/fp32", lambda: reference(False)),
                ("ours/bf16", lambda: ours(auto, True)), ("reference/bf16", lambda: reference(True)),
                ("ours_loop_recurrence/fp32", lambda: ours("loop", False)),
                ("reference_cudnn_disabled/fp32", lambda: reference(False, cudnn=False))]
    (run_variants or _run_variants)(figures, variants, batches, device, size, budget, reserve=0.3 * budget.seconds)
    for precision in ("fp32", "bf16"):
        if f"ours/{precision}/utterances_per_second" in figures and f"reference/{precision}/utterances_per_second" in figures:
            figures[f"speedup_ours_vs_reference/{precision}"] = (figures[f"ours/{precision}/utterances_per_second"]
                                                                 / figures[f"reference/{precision}/utterances_per_second"])
    if "ours/fp32/utterances_per_second" in figures and "reference_cudnn_disabled/fp32/utterances_per_second" in figures:
        # the official train_moe.py sets torch.backends.cudnn.enabled = False: what its users run today
        figures["speedup_ours_vs_reference_cudnn_disabled/fp32"] = (
            figures["ours/fp32/utterances_per_second"] / figures["reference_cudnn_disabled/fp32/utterances_per_second"])


def _run_variants(figures, variants, batches, device, size, budget: Budget, reserve: float) -> None:
    """Time each variant (built fresh, freed after) within the budget, leaving `reserve` seconds for what follows."""
    import gc

    import torch

    for position, (name, build) in enumerate(variants):
        share = (budget.left() - reserve) / (len(variants) - position)
        if share < 3:
            figures[f"{name}/skipped"] = "not enough time left in the budget"
            continue
        try:
            step = _cycle_step(batches, build())
            timing = time_steps(step, device, size["warmup"], size["steps"], time.monotonic() + min(share, 40))
            figures[f"{name}/utterances_per_second"] = _utterances_per_second(timing, batches)
            figures[f"{name}/median_step_seconds"] = timing["median_seconds"]
            figures[f"{name}/steps"] = timing["steps"]
            if device.type == "cuda":
                figures[f"{name}/peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
        except Exception as error:  # noqa: BLE001
            figures[f"{name}/error"] = f"{type(error).__name__}: {error}"
            figures[f"{name}/traceback"] = traceback.format_exc()[-2000:]
        finally:
            step = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def section_merits_l_steps(figures: dict, device, size: dict, budget: Budget, run_variants=None) -> None:
    import torch

    from bench.reference import merits_l as ref
    from merits import MeritsConfig, MeritsForConversationClassification

    batches = [_to(b, device) for b in conversation_batches(size, seed=1)]
    text_hidden, audio_hidden = size["hidden"], max(1, size["hidden"] // 4)  # 512 text / 128 speech

    def ours(stage: str, bf16: bool):
        torch.manual_seed(0)
        config = MeritsConfig(architecture="merits-l", text_embed_dim=size["dim"], audio_embed_dim=size["dim"],
                              context_text_hidden_size=text_hidden, context_audio_hidden_size=audio_hidden,
                              fusion_hidden_size=size["fusion_dim"], stage=stage,
                              recurrence=size.get("recurrence", "auto"), id2label={i: f"class_{i}" for i in range(NUM_CLASSES)})
        model = MeritsForConversationClassification(config).to(device).train()
        exported = {}
        if stage == "fusion":  # stage III trains on the stage II features exported once (§3.1), as the trainer does
            with torch.no_grad(), _autocast(device, bf16):
                for i, b in enumerate(batches):
                    out = model(text_embeds=b["text"], audio_embeds=b["audio"], turn_mask=b["turn_mask"], stage="context")
                    exported[i] = (out.text_context_features.float(), out.audio_context_features.float())
        model.freeze_for_stage(stage)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        index = {id(b): i for i, b in enumerate(batches)}

        def run_one(b):
            kwargs = dict(text_embeds=b["text"], audio_embeds=b["audio"], turn_mask=b["turn_mask"],
                          labels=b["labels_ours"], stage=stage)
            if stage == "fusion":
                kwargs["text_context_features"], kwargs["audio_context_features"] = exported[index[id(b)]]
            with _autocast(device, bf16):
                loss = model(**kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return run_one

    def reference(stage: str, bf16: bool):
        torch.manual_seed(0)
        model = ref.ReferenceMeritsL(size["dim"], size["dim"], NUM_CLASSES, text_hidden, audio_hidden,
                                     size["fusion_dim"]).to(device)
        optimizer = ref.make_optimizer(model, stage, lr=1e-4)

        def run_one(b):
            with _autocast(device, bf16):
                ref.train_step(model, optimizer, b["audio"], b["text"], b["labels_reference"], stage=stage)

        return run_one

    variants = []
    for stage, label in (("context", "stage_ii"), ("fusion", "stage_iii")):
        for precision, bf16 in (("fp32", False), ("bf16", True)):
            variants.append((f"{label}/ours/{precision}", lambda s=stage, x=bf16: ours(s, x)))
            variants.append((f"{label}/reference/{precision}", lambda s=stage, x=bf16: reference(s, x)))
    (run_variants or _run_variants)(figures, variants, batches, device, size, budget, reserve=0.15 * budget.seconds)
    for label in ("stage_ii", "stage_iii"):
        for precision in ("fp32", "bf16"):
            a, b = f"{label}/ours/{precision}/utterances_per_second", f"{label}/reference/{precision}/utterances_per_second"
            if a in figures and b in figures:
                figures[f"{label}/speedup_ours_vs_reference/{precision}"] = figures[a] / figures[b]


def section_extraction(figures: dict, device, size: dict, smoke: bool, budget: Budget, peak_tflops) -> None:
    import numpy as np
    import torch
    from transformers import RobertaConfig, WavLMConfig

    from bench.bench_extraction import speech_seconds, text_lengths, transformer_flops, wavlm_flops
    from merits import MeritsConfig, MeritsForConversationClassification

    if smoke:
        text_config = RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=130)
        audio_config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                                   num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=32,
                                   max_bucket_distance=100)
    else:  # roberta-large; microsoft/wavlm-base-plus sizes (the WavLMConfig defaults)
        text_config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1)
        audio_config = WavLMConfig(feat_extract_norm="group", do_stable_layer_norm=False)
    dtype = torch.bfloat16
    figures["peak_tflops_per_second"] = peak_tflops
    figures["weights_dtype"] = "bfloat16"
    rng = np.random.default_rng(0)

    def measure(name, model, items, pad, flops_of, batch_size):
        order = sorted(range(len(items)), key=lambda i: items[i]["length"])
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        padded = [_to(pad([items[i] for i in batch]), device) for batch in batches]

        def run_all():
            with torch.inference_mode():
                for inputs in padded:
                    model.get_utterance_embeddings(**inputs)

        run_all()  # warm-up (kernels, cuDNN/cuBLAS heuristics)
        _sync(device)
        deadline = time.monotonic() + max(5.0, min(45.0, (budget.left() - 20) / 2))
        rounds, start = 0, time.perf_counter()
        while rounds < 3 and (rounds == 0 or time.monotonic() < deadline):
            run_all()
            rounds += 1
        _sync(device)
        seconds = (time.perf_counter() - start) / rounds
        flops = flops_of(range(len(items)))
        figures[f"{name}/utterances_per_second"] = len(items) / seconds
        figures[f"{name}/tflops_per_second"] = flops / seconds / 1e12
        if peak_tflops:
            figures[f"{name}/fraction_of_bf16_matmul_peak"] = flops / seconds / 1e12 / peak_tflops
        figures[f"{name}/utterances"] = len(items)
        figures[f"{name}/batches"] = len(batches)
        figures[f"{name}/rounds"] = rounds
        figures[f"{name}/padded_per_real_position"] = (
            sum(len(b) * max(items[i]["length"] for i in b) for b in batches) / sum(it["length"] for it in items))

    # text: roberta-large
    config = MeritsConfig(architecture="merits-l", text_config=text_config, id2label={0: "a", 1: "b"})
    model = MeritsForConversationClassification(config).eval().to(device, dtype)
    lengths = text_lengths(size["text_utterances"], 0, 60 if not smoke else 20)
    texts = [{"ids": rng.integers(3, text_config.vocab_size, size=n), "length": n} for n in lengths]

    def pad_text(items):
        longest = max(it["length"] for it in items)
        ids = torch.full((len(items), longest), text_config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, : it["length"]] = torch.as_tensor(it["ids"])
            ids[row, 0] = text_config.bos_token_id
            mask[row, : it["length"]] = 1
        return {"input_ids": ids, "attention_mask": mask}

    figures["text/backbone"] = ("tiny roberta (smoke)" if smoke else
                                "roberta-large sizes (24 x 1024, ffn 4096)") + ", random weights"
    figures["text/mean_tokens"] = float(np.mean(lengths))
    measure("text", model, texts, pad_text, lambda idx: transformer_flops(
        [lengths[i] for i in idx], text_config.num_hidden_layers, text_config.hidden_size, text_config.intermediate_size),
        size["text_batch"])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # speech: wavlm-base-plus
    config = MeritsConfig(architecture="merits-l", audio_config=audio_config, id2label={0: "a", 1: "b"})
    model = MeritsForConversationClassification(config).eval().to(device, dtype)
    seconds = speech_seconds(size["speech_utterances"], 0, size["max_seconds"])
    samples = [int(s * 16000) for s in seconds]
    waves = [{"wave": rng.standard_normal(n).astype(np.float32) * 0.1, "length": n} for n in samples]

    def pad_speech(items):
        longest = max(it["length"] for it in items)
        values = torch.zeros(len(items), longest, dtype=dtype)
        mask = torch.zeros(len(items), longest, dtype=torch.long)
        for row, it in enumerate(items):
            values[row, : it["length"]] = torch.as_tensor(it["wave"])
            mask[row, : it["length"]] = 1
        return {"input_values": values, "audio_attention_mask": mask}

    figures["speech/backbone"] = ("tiny wavlm (smoke)" if smoke else
                                  "wavlm-base-plus sizes (12 x 768 + conv feature encoder)") + ", random weights"
    figures["speech/mean_seconds"] = float(np.mean(seconds))
    measure("speech", model, waves, pad_speech, lambda idx: wavlm_flops([samples[i] for i in idx], audio_config),
            size["speech_batch"])


# ------------------------------------------------------------------------------------------------------ main


SECTIONS = ("environment", "matmul_peak", "model_tests", "moe_step", "merits_l_steps", "extraction", "host_tests")


def record_json(path: Path, name: str | None = None) -> dict:
    """Store a finished device check's figures (flattened as section/key) via bench/common.record."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import record

    data = json.loads(path.read_text())
    env = data["sections"].get("environment", {})
    gpu = str(env.get("gpu") or data["meta"]["device"])
    figures = {}
    for section, values in data["sections"].items():
        if section == "environment":
            continue
        for key, value in values.items():
            if key.endswith(("output_tail", "traceback")):
                continue  # long multi-line text: in the JSON itself
            if isinstance(value, (int, float, str, bool)) or value is None:
                figures[f"{section}/{key}"] = value
            elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                figures[f"{section}/{key}"] = ",".join(str(v) for v in value)
    machine = {"gpu": gpu, "platform": f"{gpu}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}",
               "cpu_count": env.get("cpu_count"), "torch": env.get("torch"),
               "torch_threads": env.get("torch_threads"), "python": env.get("python"),
               "transformers": env.get("transformers"), "accelerate": env.get("accelerate")}
    name = name or "device_check_" + gpu.lower().replace("nvidia ", "").replace(" ", "_")
    notes = (f"measured on {gpu} by `bash bench/device_check.sh` ({data['meta'].get('mode')}, "
             f"{data['meta'].get('total_seconds')} s); errors: {', '.join(data['meta'].get('errors') or []) or 'none'}; "
             f"source {path.name}")
    moe = data["sections"].get("moe_step", {})
    if "ours/fp32/utterances_per_second" in moe and "reference_cudnn_disabled/fp32/utterances_per_second" in moe:
        figures.setdefault("moe_step/speedup_ours_vs_reference_cudnn_disabled/fp32",
                           moe["ours/fp32/utterances_per_second"] / moe["reference_cudnn_disabled/fp32/utterances_per_second"])
    command = " ".join(["bash bench/device_check.sh", *data["meta"].get("command", "").split()[1:]])
    return record(name, figures, notes=notes, command=command, machine=machine,
                  date=data["meta"].get("started_utc"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                        help="tiny sizes on CPU: the same code paths, no figure to conclude from")
    parser.add_argument("--out", default=None, help="the JSON path (default $OUT/device_check.json, else bench/out/)")
    parser.add_argument("--budget_seconds", type=float, default=None,
                        help="global time budget (default 360 on a GPU, 150 with --cpu-smoke)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset, e.g. environment,moe_step,merits_l_steps")
    parser.add_argument("--record", default=None, metavar="JSON",
                        help="do not measure: store a device check JSON (e.g. from the GPU machine) in "
                             "bench/results.json and bench/RESULTS.md as the entry device_check_<gpu>")
    parser.add_argument("--record_name", default=None, metavar="NAME",
                        help="with --record: the entry's name instead of device_check_<gpu> (keeps an earlier "
                             "run's entry, e.g. device_check_h200_run2)")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; valid: {', '.join(SECTIONS)}")
    if args.record:
        return record_json(Path(args.record), name=args.record_name)

    import torch

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        print("[device_check] no CUDA device: running the CPU smoke sizes (use --cpu-smoke to ask for them)",
              file=sys.stderr)
        smoke = True
    if smoke:
        # tiny sizes gain nothing from threads, and on a busy host every small op's OpenMP barrier then waits for a
        # time slice (a tiny MoE step took seconds): one thread
        torch.set_num_threads(1)
    budget = Budget(args.budget_seconds or (150.0 if smoke else 360.0))
    if args.out:
        path = Path(args.out)
    elif os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "device_check.json"
    else:
        path = REPO / "bench" / "out" / "device_check.json"
    size = sizes(smoke)
    report = Report(path, {"mode": "cpu-smoke" if smoke else "device", "device": str(device), "sizes": size,
                           "budget_seconds": budget.seconds, "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                           "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    wanted = set(args.sections.split(","))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in the fp32 rows
        torch.backends.cudnn.allow_tf32 = False
    if "environment" in wanted:
        report.section("environment", section_environment, device)
    if "matmul_peak" in wanted:
        report.section("matmul_peak", section_matmul_peak, device, size, budget)
    if "model_tests" in wanted:
        report.section("model_tests", section_model_tests, device, smoke, budget)
    if "moe_step" in wanted:
        report.section("moe_step", section_moe_step, device, size, budget)
    if "merits_l_steps" in wanted:
        report.section("merits_l_steps", section_merits_l_steps, device, size, budget)
    if "extraction" in wanted:
        peak = report.data["sections"].get("matmul_peak", {}).get("tflops_per_second")
        report.section("extraction", section_extraction, device, size, smoke, budget, peak)
    if "host_tests" in wanted:
        report.section("host_tests", section_model_tests, device, smoke, budget, True)
    report.data["meta"]["total_seconds"] = round(time.monotonic() - budget.start, 1)
    report.data["meta"]["errors"] = sorted(
        name for name, figures in report.data["sections"].items()
        if "error" in figures or any(k.endswith("/error") for k in figures))
    report.write()
    print(f"[device_check] wrote {path} in {report.data['meta']['total_seconds']} s; sections with errors: "
          f"{report.data['meta']['errors'] or 'none'}", file=sys.stderr)
    return report.data


if __name__ == "__main__":
    main()
