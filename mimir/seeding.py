"""Every random stream of a run derives from one place: :func:`stream_seed` of the run's ``seed``.

A stream is named for what draws from it, and keyed on the epoch, the worker's rank and the dataset
row where those matter. Each draw is then a function of (seed, stream, epoch, rank, row) alone: a
run resumed at epoch k draws what the uninterrupted run drew there (no RNG state is saved), a row is
augmented the same whichever block, task or node processed it, and two streams never share draws.
"""

from __future__ import annotations

import numpy as np

# the streams, each with a fixed key: renaming one changes no number, adding one changes none of the others
STREAMS = {
    "init": 1,        # model weights (the same on every rank)
    "step": 2,        # a worker's torch draws in one epoch: masks, attack starts, drop path
    "augment": 3,     # one row's crop, flip and RandAugment draws in one epoch
    "mix": 4,         # one batch's MixUp / CutMix draw in one epoch
    "shuffle": 5,     # a worker's local shuffle buffer in one epoch
    "file_order": 6,  # the order of the split's files (Ray Data adds the epoch)
    "block_order": 7, # the order of a cached split's blocks (Ray Data adds the epoch)
    "generated": 8,   # which generated rows join an epoch (Ray Data adds the epoch)
    "split": 9,       # the validation hold-out
    "evaluate": 10,   # the evaluation attacks' random starts (PGD, AutoAttack, a loss surface's PGD)
    "directions": 11, # a loss surface's two random directions
    "mixed_order": 12,  # the order of an epoch's real and generated rows (Ray Data adds the epoch)
}


def stream_seed(seed: int, stream: str, *, epoch: int = 0, rank: int = 0, row: int = 0) -> int:
    """The seed of one random stream: a 63-bit integer (valid for torch, numpy and Ray Data alike)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r} (one of {', '.join(STREAMS)})")
    state = np.random.SeedSequence([seed, STREAMS[stream], epoch, rank, row]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))
