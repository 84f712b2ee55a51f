"""Per-turn latency at turn N (default 50): streaming (`ConversationStream`, reusing the model's state)
against recomputing the whole conversation at every turn (the pipeline on the N-turn prefix).

Full-size causal MiSTER-E with random weights: roberta-large-size text encoder + acoustic-feature speech
route. Also reported: recomputing only the context/fusion/gate part from cached utterance embeddings
(the best a non-streaming server could do), so that the streaming gain is not only the encoder cache.

    python bench/bench_streaming.py [--turn 50] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_inference import full_size_model, synthetic_conversations  # noqa: E402
from bench.common import record  # noqa: E402
from merits.pipeline_merits import ConversationEmotionRecognitionPipeline  # noqa: E402
from merits.streaming import ConversationStream  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turn", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of turn N (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = full_size_model(causal=True)
    conversation = synthetic_conversations(1, args.turn, seed=1)[0]
    last = conversation[-1]

    # streaming: feed turns 1..N-1, then time turn N (state copied so that the timed turn can repeat)
    stream = ConversationStream(model, processor)
    for turn in conversation[:-1]:
        stream.add_turn(**turn)
    first_turns = stream.latencies[:5]
    state = stream.state
    stream_times = []
    for _ in range(args.repeats):
        stream.state = state
        stream.predictions = stream.predictions[: args.turn - 1]
        start = time.perf_counter()
        streamed = stream.add_turn(**last)
        stream_times.append(time.perf_counter() - start)

    # recompute: the whole N-turn conversation through the pipeline
    classifier = ConversationEmotionRecognitionPipeline(model=model, processor=processor, device=-1)
    recompute_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        full = classifier(conversation, utterance_batch_size=16)
        recompute_times.append(time.perf_counter() - start)

    # recompute only context/fusion/gate from cached utterance embeddings
    batch = processor(conversations=[conversation], return_tensors="pt")
    with torch.inference_mode():
        embeds = model.get_utterance_embeddings(**batch)
    context_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            model(text_embeds=embeds["text"][None], audio_embeds=embeds["audio"][None])
        context_times.append(time.perf_counter() - start)

    difference = max(abs(streamed["scores"][k] - full[-1]["scores"][k]) for k in streamed["scores"])
    stream_seconds = statistics.median(stream_times)
    figures = {
        "turn": args.turn,
        "streaming_seconds_per_turn": stream_seconds,
        "streaming_seconds_first_turns_mean": statistics.mean(first_turns),
        "recompute_whole_conversation_seconds": statistics.median(recompute_times),
        "recompute_context_only_from_cached_embeddings_seconds": statistics.median(context_times),
        "speedup_streaming_vs_recompute": statistics.median(recompute_times) / stream_seconds,
        "streaming_label_equals_recompute": streamed["label"] == full[-1]["label"],
        "max_probability_difference_streaming_vs_recompute": difference,
    }
    record("streaming", figures, notes=(
        f"causal mister-e, roberta-large-size text encoder (random weights) + acoustic-feature speech route; one "
        f"synthetic conversation of {args.turn} turns (4-40 words, 0.5-3 s each); median of {args.repeats} timings of "
        f"turn {args.turn}; {args.threads} threads"))


if __name__ == "__main__":
    main()
