"""The global order of samples: a function of (seed, phase, global position) only.

* one source: position p is sample ``perm_k(p mod N)`` of epoch ``k = p // N``, where ``perm_k`` is a
  pseudo-random permutation of [0, N) keyed by (seed, phase, k) -- a Feistel network with cycle
  walking, computed per position in O(1) memory, so resuming at sample 10^10 costs nothing;
* a mixture: positions come in blocks of ``MIX_BLOCK``; each block holds a fixed number of samples
  of every source (its weight, a share of TOKENS, turned into a share of samples with the source's
  mean sample length) in a keyed random order; each source walks through its own epochs as above
  (a small source repeats, a large one is partly used).

Token counts come from each split's lengths (``lengths.npy``, memory-mapped), so the order, the token
clock and the batch-size warmup are planned without reading samples. Reading the sources is
ettin.data.formats'; cutting the order into steps is ettin.data.loader's.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

MIX_BLOCK = 1 << 20  # positions per mixture block: proportions are exact to 1 / MIX_BLOCK per block


# ------------------------------------------------------------------------------------------------
# Keyed permutations


def _key(*parts) -> int:
    """A 64-bit key from any parts (str() of each)."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def permute(x: np.ndarray, n: int, key: int, rounds: int = 6) -> np.ndarray:
    """``perm(x)`` for a pseudo-random permutation of [0, n) chosen by ``key``: a balanced Feistel
    network on the smallest even number of bits covering n, cycle-walking back into [0, n)."""
    x = np.asarray(x, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    shift = np.uint64(half)
    keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def once(y: np.ndarray) -> np.ndarray:
        left, right = y >> shift, y & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        y = once(x)
        outside = y >= np.uint64(n)
        while outside.any():
            y[outside] = once(y[outside])
            outside = y >= np.uint64(n)
    return y


# ------------------------------------------------------------------------------------------------
# Mixtures


class Mixture:
    """The global order over one or several prepared folders (see the module docstring).

    ``weights`` are shares of tokens (as the Ettin mixture tables give them), turned into shares of
    samples with each source's mean sample length (capped at ``seq_len``)."""

    def __init__(self, splits: Sequence, weights: Sequence[float], *, seed: int,
                 phase, seq_len: int) -> None:
        self.splits, self.seed, self.phase, self.seq_len = list(splits), int(seed), str(phase), seq_len
        for split in self.splits:
            if not len(split):
                raise ValueError(f"{split.root}/{split.split} holds no samples; prepare it from more "
                                 "text or leave it out of the mixture")
        self.sizes = np.array([len(s) for s in self.splits], dtype=np.int64)
        shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.token_shares = shares
        if len(self.splits) == 1:
            self.block_counts = np.array([MIX_BLOCK], dtype=np.int64)
        else:
            mean = np.array([s.mean_length(seq_len) for s in self.splits])
            sample_shares = shares / mean
            sample_shares /= sample_shares.sum()
            self.block_counts = largest_remainder(sample_shares, MIX_BLOCK)
            if (self.block_counts == 0).any():
                small = [str(s.root) for s, c in zip(self.splits, self.block_counts) if c == 0]
                raise ValueError(f"sources {small} have weights too small to be sampled "
                                 f"(< 1 in {MIX_BLOCK:,} samples)")
        self.block_starts = np.concatenate(([0], np.cumsum(self.block_counts)))

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index) of each global position."""
        p = np.asarray(positions, dtype=np.int64)
        if len(self.splits) == 1:
            source = np.zeros(p.shape, dtype=np.int64)
            k = p
        else:
            block, offset = p // MIX_BLOCK, p % MIX_BLOCK
            slot = np.empty(p.shape, dtype=np.int64)
            for b in np.unique(block):
                here = block == b
                slot[here] = permute(offset[here], MIX_BLOCK,
                                     _key(self.seed, self.phase, "mix", int(b))).astype(np.int64)
            source = np.searchsorted(self.block_starts, slot, side="right") - 1
            k = block * self.block_counts[source] + (slot - self.block_starts[source])
        index = np.empty(p.shape, dtype=np.int64)
        for i in np.unique(source):
            here = source == i
            n = int(self.sizes[i])
            epoch, within = k[here] // n, k[here] % n
            out = np.empty(within.shape, dtype=np.int64)
            for e in np.unique(epoch):
                sel = epoch == e
                out[sel] = permute(within[sel], n, _key(self.seed, self.phase, "source", int(i),
                                                         "epoch", int(e))).astype(np.int64)
            index[here] = out
        return source, index

    def lengths(self, start: int, count: int) -> np.ndarray:
        """The lengths (capped at seq_len) of the samples at positions [start, start + count)."""
        source, index = self.locate(np.arange(start, start + count, dtype=np.int64))
        out = np.empty(count, dtype=np.int64)
        for i in np.unique(source):
            here = source == i
            out[here] = np.asarray(self.splits[i].lengths)[index[here]]
        return np.minimum(out, self.seq_len)

    def samples(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """(global position, tokens) for positions [start, start + count)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        source, index = self.locate(positions)
        return [(int(p), self.splits[int(s)].tokens(int(i)))
                for p, s, i in zip(positions, source, index)]


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[:rest]] += 1
    return counts
