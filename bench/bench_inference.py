"""Batched inference (pipeline: conversations batched, utterances sorted by length, inference_mode, optional
bf16) against the naive loop (one utterance at a time through the encoder, then one conversation at a time).

Full-size model with random weights (costs the same as trained ones): a roberta-large-size text encoder
(24 layers, d=1024) + the acoustic-feature speech route, MiSTER-E head (paper sizes). Synthetic
conversations of turns of 4-40 words and 0.5-3 s of audio.

    python bench/bench_inference.py [--conversations 8] [--turns 8]

The default (64 utterances: two pipeline batches of 4 conversations) takes about 2-3 minutes on an idle
2-core machine, most of it in the naive loop; ``total_seconds`` and ``process_cpu_seconds`` are recorded
with the figures (on a shared machine, ``process_cpu_seconds / threads`` estimates the idle wall time).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from merits import MeritsConfig, MeritsForConversationClassification, MeritsProcessor  # noqa: E402
from merits.feature_extraction_merits import MeritsAcousticFeatureExtractor  # noqa: E402
from merits.pipeline_merits import ConversationEmotionRecognitionPipeline  # noqa: E402

WORDS = ("i really did not expect that to happen today but here we are again talking about the same old "
         "thing you know how it goes when nobody listens and everyone is tired of waiting").split()


def word_level_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", model_max_length=512)


def full_size_model(causal=False):
    from transformers import RobertaConfig

    torch.manual_seed(0)
    extractor = MeritsAcousticFeatureExtractor()
    text_config = RobertaConfig(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    config = MeritsConfig(architecture="mister-e", text_config=text_config, audio_feature_dim=extractor.feature_size,
                          id2label=dict(enumerate(["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"])),
                          causal=causal)
    model = MeritsForConversationClassification(config).eval()
    return model, MeritsProcessor(tokenizer=word_level_tokenizer(), feature_extractor=extractor)


def synthetic_conversations(count, turns, seed=0):
    rng = np.random.default_rng(seed)
    conversations = []
    for _ in range(count):
        conversation = []
        for _ in range(turns):
            seconds = float(rng.uniform(0.5, 3.0))
            audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
            conversation.append({"text": " ".join(rng.choice(WORDS, int(rng.integers(4, 41)))), "audio": audio,
                                 "sampling_rate": 16000})
        conversations.append(conversation)
    return conversations


def naive_loop(model, processor, conversations):
    """One utterance per encoder call, one conversation per context/gate call (no_grad, float32)."""
    results = []
    with torch.no_grad():
        for conversation in conversations:
            text, audio = [], []
            for turn in conversation:
                batch = processor(conversations=[[turn]], return_tensors="pt")
                embeds = model.get_utterance_embeddings(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    audio_features=batch["audio_features"], turn_mask=batch["turn_mask"])
                text.append(embeds["text"])
                audio.append(embeds["audio"])
            logits = model(text_embeds=torch.cat(text)[None], audio_embeds=torch.cat(audio)[None]).logits
            results.append(logits.softmax(-1)[0])
    return results


def timed(function, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        output = function()
        best = min(best, time.perf_counter() - start)
    return best, output


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--utterance-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before, run_start, cpu_start = os.getloadavg()[0], time.perf_counter(), time.process_time()

    model, processor = full_size_model()
    conversations = synthetic_conversations(args.conversations, args.turns)
    utterances = args.conversations * args.turns
    classifier = ConversationEmotionRecognitionPipeline(model=model, processor=processor, device=-1)

    classifier(conversations[:1])  # warm-up
    naive_seconds, naive = timed(lambda: naive_loop(model, processor, conversations))
    batched_seconds, batched = timed(lambda: classifier(conversations, batch_size=args.batch_size,
                                                        utterance_batch_size=args.utterance_batch_size))
    bf16_seconds, bf16 = timed(lambda: classifier(conversations, batch_size=args.batch_size,
                                                  utterance_batch_size=args.utterance_batch_size, bf16=True))
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    as_array = lambda out: np.concatenate([[[t["scores"][n] for n in names] for t in c] for c in out])  # noqa: E731
    naive_array = torch.cat(naive).numpy()
    max_diff = float(np.abs(as_array(batched) - naive_array).max())
    bf16_diff = float(np.abs(as_array(bf16) - naive_array).max())
    bf16_agree = float((as_array(bf16).argmax(1) == naive_array.argmax(1)).mean())

    figures = {
        "utterances": utterances,
        "naive_seconds": naive_seconds,
        "batched_seconds": batched_seconds,
        "batched_bf16_seconds": bf16_seconds,
        "naive_utterances_per_second": utterances / naive_seconds,
        "batched_utterances_per_second": utterances / batched_seconds,
        "batched_bf16_utterances_per_second": utterances / bf16_seconds,
        "speedup_batched_vs_naive": naive_seconds / batched_seconds,
        "speedup_batched_bf16_vs_naive": naive_seconds / bf16_seconds,
        "max_probability_difference_batched_vs_naive": max_diff,
        "max_probability_difference_bf16_vs_naive": bf16_diff,
        "bf16_label_agreement_with_naive": bf16_agree,
        "torch_threads": torch.get_num_threads(),
        "total_seconds": time.perf_counter() - run_start,
        "process_cpu_seconds": time.process_time() - cpu_start,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
    record("inference", figures, notes=(
        f"mister-e, roberta-large-size text encoder (random weights) + acoustic-feature speech route; "
        f"{args.conversations} synthetic conversations x {args.turns} turns of 4-40 words / 0.5-3 s; "
        f"pipeline batch_size={args.batch_size}, utterance_batch_size={args.utterance_batch_size}; "
        f"{args.threads} threads; one timed run each after a warm-up; total_seconds = the whole run (model build "
        f"included); the machine is shared, see load_average_*"))


if __name__ == "__main__":
    main()
