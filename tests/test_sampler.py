"""The trainer's length-grouped sampler: random but reproducible epochs of length-homogeneous batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader

from merits.training.arguments import TrainingArguments, parse_args
from merits.training.loop import (
    EpochShuffleSampler,
    LengthGroupedSampler,
    StagePlan,
    item_lengths,
    training_sampler,
)


def gamma_lengths(n: int, seed: int = 0) -> list[int]:
    """IEMOCAP-like conversation lengths: 20 + gamma, up to 110 turns."""
    rng = np.random.default_rng(seed)
    return [int(min(110, 20 + rng.gamma(2.0, 15.0))) for _ in range(n)]


def epoch_order(sampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def padded_per_real(lengths, order, batch_size) -> float:
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths)


def test_same_seed_and_epoch_give_the_same_order_and_epochs_differ():
    lengths = gamma_lengths(120)
    first, second = LengthGroupedSampler(lengths, 8, seed=3), LengthGroupedSampler(lengths, 8, seed=3)
    assert epoch_order(first, 0) == epoch_order(second, 0)
    assert epoch_order(first, 5) == epoch_order(second, 5)
    assert epoch_order(first, 0) != epoch_order(first, 1)
    assert epoch_order(first, 0) != epoch_order(LengthGroupedSampler(lengths, 8, seed=4), 0)
    # the batches' composition changes too, not only their order
    batches = [{frozenset(b) for b in (first.set_epoch(e), first.batches())[1]} for e in (0, 1)]
    assert batches[0] != batches[1]


@pytest.mark.parametrize("n,batch_size,mult", [(120, 8, None), (101, 8, None), (7, 8, None), (50, 3, 2), (33, 1, None)])
def test_every_index_exactly_once(n, batch_size, mult):
    sampler = LengthGroupedSampler(gamma_lengths(n, seed=n), batch_size, seed=0, mega_batch_mult=mult)
    for epoch in range(3):
        order = epoch_order(sampler, epoch)
        assert sorted(order) == list(range(n))
        assert len(sampler) == n


def test_consecutive_indices_form_the_length_sorted_batches():
    lengths = gamma_lengths(101)
    sampler = LengthGroupedSampler(lengths, 8, seed=1)
    sampler.set_epoch(2)
    batches = sampler.batches()
    assert [len(b) for b in batches[:-1]] == [8] * 12 and len(batches[-1]) == 5  # the one short batch comes last
    order = list(sampler)
    assert [order[i : i + 8] for i in range(0, 101, 8)] == batches
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_batches_are_length_homogeneous():
    lengths, batch_size = gamma_lengths(400, seed=7), 8
    grouped = np.mean([padded_per_real(lengths, epoch_order(LengthGroupedSampler(lengths, batch_size, 0), e), batch_size)
                       for e in range(4)])
    plain = np.mean([padded_per_real(lengths, epoch_order(EpochShuffleSampler(len(lengths), 0), e), batch_size)
                     for e in range(4)])
    # padding computed beyond the real turns: random batches waste far more than grouped ones
    assert plain - 1 > 0.3
    assert grouped - 1 < 0.35 * (plain - 1), (grouped, plain)


def test_equal_lengths_keep_the_random_order():
    """All ties: the sort is stable, so the order is the epoch's permutation, cut and shuffled by batch."""
    sampler = LengthGroupedSampler([5] * 64, 8, seed=0)
    orders = {tuple(epoch_order(sampler, e)) for e in range(5)}
    assert len(orders) == 5
    assert all(sorted(o) == list(range(64)) for o in orders)


def test_resumed_epoch_sees_exactly_the_unbroken_batches():
    """``accelerator.skip_first_batches`` on a resumed loader == the rest of the unbroken epoch."""
    from accelerate import Accelerator

    from merits.training.loop import cpu_only

    accelerator = Accelerator(cpu=cpu_only())
    lengths = gamma_lengths(45, seed=2)
    dataset = list(range(45))

    def loader():
        sampler = LengthGroupedSampler(lengths, 4, seed=11)
        return accelerator.prepare(DataLoader(dataset, batch_size=4, sampler=sampler, generator=torch.Generator()))

    unbroken = loader()
    unbroken.set_epoch(3)
    full = [b.tolist() for b in unbroken]
    resumed = loader()  # a new process would build it again from the same seed
    resumed.set_epoch(3)
    tail = [b.tolist() for b in accelerator.skip_first_batches(resumed, 5)]
    assert tail == full[5:]
    assert full != [b.tolist() for b in (unbroken.set_epoch(4), unbroken)[1]]


def test_ranks_share_one_sorted_batch_per_update():
    """Under DDP accelerate deals per-process batches round-robin: both ranks' step batches come from one
    length-sorted update batch, and together they cover every item."""
    from accelerate.data_loader import BatchSamplerShard

    lengths, per_device, processes = gamma_lengths(64, seed=5), 4, 2
    sampler = LengthGroupedSampler(lengths, per_device * processes, seed=0)
    sampler.set_epoch(1)
    updates = sampler.batches()
    shards = [list(BatchSamplerShard(BatchSampler(sampler, per_device, drop_last=False), processes, rank))
              for rank in range(processes)]
    assert len(shards[0]) == len(shards[1]) == len(updates)
    for step, update in enumerate(updates):
        assert shards[0][step] + shards[1][step] == update
    assert sorted(i for shard in shards for batch in shard for i in batch) == list(range(64))


def test_item_lengths_read_turns_or_utterance_length():
    conversation = [{"label": 0, "text_embeds": np.zeros(4)} for _ in range(7)]
    assert item_lengths([conversation, conversation[:2]]) == [7, 2]
    utterances = [[{"text": "hello there"}], [{"audio": {"array": np.zeros(160), "sampling_rate": 16000}}],
                  [{"audio_features": np.zeros(8)}]]
    assert item_lengths(utterances) == [11, 160, 1]


def test_stage_option_picks_the_sampler():
    defaults = TrainingArguments()
    assert defaults.context.group_by_length and defaults.fusion.group_by_length and defaults.moe.group_by_length
    assert not defaults.utterance.group_by_length and not defaults.pretrain.group_by_length
    args = parse_args(["--moe.group_by_length", "false", "--context.gradient_accumulation_steps", "2"], default_config=None)
    items = [[{"label": 0}] * n for n in gamma_lengths(20)]

    def plan(arguments):
        return StagePlan("moe", "moe", [], items, items, None, lambda batch: batch, arguments)

    assert isinstance(training_sampler(plan(args.moe), 0, per_device=4, processes=1), EpochShuffleSampler)
    grouped = training_sampler(plan(args.context), 0, per_device=4, processes=2)
    assert isinstance(grouped, LengthGroupedSampler)
    assert grouped.batch_size == 16  # one optimiser update: 4 per process x 2 processes x 2 accumulation steps
    assert grouped.lengths == [len(item) for item in items]
