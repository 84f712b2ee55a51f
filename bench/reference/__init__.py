"""Faithful re-implementations of the reference (authors') training loops, for the speed/accuracy benchmarks.

- :mod:`bench.reference.mister_e`: the MiSTER-E ``AttentionMoE`` and its ``train_moe.py`` losses and loop.
- :mod:`bench.reference.merits_l`: the MERITS-L Stage II Bi-GRU + self-attention and Stage III co-attention.

They reproduce the released code's behaviour (no packing, no padding masks, losses over padded rows) on
purpose: they are the yardstick, not a model to use.
"""
