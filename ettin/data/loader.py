"""Deterministic, resumable, rank-aware batches: one optimizer step at a time.

Step s takes the next ``global_batch_at(tokens)`` positions of the global order (ettin.data.order);
rank r takes its contiguous slice and cuts it into micro-batches. Hence the order does not depend on
the number of workers (worker w builds the steps s with (s - first step) % workers == w, and the
DataLoader takes workers in turn) nor on the world size (the same global batch is sliced
differently), and resuming needs only the counters ``LoaderState(step, samples, tokens)``: no batch
is replayed. Token counts come from the splits' lengths, so every worker plans steps, and the
batch-size warmup, without reading samples. The sources and their formats are ettin.data.formats'.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ettin.data.formats import (check_prepared_tokenizer, fit_row, normalize_sources, open_released_order,
                                open_splits, source_format)
from ettin.data.order import Mixture, largest_remainder

log = logging.getLogger("ettin")


@dataclass
class LoaderState:
    """Global counters after ``step`` optimizer steps of a phase (the same on every rank), and the
    digest of the rows delivered: the one owner of the loader's position. The loader makes the
    counters, the module carries them step by step (``after``), a checkpoint adds up the ranks'
    digests (``of_all_ranks``) and a resume reads them back (``resumed``)."""

    step: int = 0
    samples: int = 0  # global positions consumed
    tokens: int = 0  # tokens of those samples (sum of min(length, seq_len)), all ranks together
    # The rows delivered so far in the phase, observed (rows_digest): this rank's part while training,
    # all ranks' in a checkpoint; None when a checkpoint written before digests was resumed.
    data_digest: Optional[str] = "0" * 64

    @classmethod
    def resumed(cls, recorded: Optional[dict]) -> "LoaderState":
        """The state a checkpoint's meta recorded (a phase's start without one); a checkpoint written
        before data digests resumes with the digest unknown, not restarted."""
        return cls(**{"data_digest": None, **recorded}) if recorded else cls()

    def on_rank(self, rank: int) -> "LoaderState":
        """What ``rank`` carries on from a resumed state: a resumed digest is all ranks' rows, so rank
        0 carries it on and every other rank starts its part from zero."""
        return self if rank == 0 else replace(self, data_digest=add_digests())

    def after(self, batch: "StepBatch") -> "LoaderState":
        """The state after this rank trained ``batch``: its counters, this rank's digest grown by
        the batch's rows."""
        return replace(batch.state, data_digest=add_digests(self.data_digest, batch.rows_digest))

    def of_all_ranks(self, digests: Sequence[Optional[str]]) -> "LoaderState":
        """This state with every rank's digest added up (the rows all ranks were given)."""
        return replace(self, data_digest=add_digests(*digests))


DIGEST_MODULUS = 1 << 256


def rows_digest(samples: Sequence[tuple[int, np.ndarray]], seq_len: int) -> str:
    """The digest of rows as delivered: the sum (mod 2**256) over rows of sha256(global position,
    the row's first ``seq_len - 1`` token ids). A sum, so ranks' parts add up to the same digest on
    any world size, and steps add up to the phase's; each term names its position, so another
    order is another digest. ``seq_len - 1`` tokens: what both runs of a pair read (an encoder's full
    row ends one token early, to fit its closing [SEP])."""
    total = 0
    for position, row in samples:
        kept = np.asarray(row[:seq_len - 1], dtype=np.int64)
        term = hashlib.sha256(np.array([position, len(kept)], dtype=np.int64).tobytes() + kept.tobytes())
        total += int.from_bytes(term.digest(), "big")
    return f"{total % DIGEST_MODULUS:064x}"


def add_digests(*digests: Optional[str]) -> Optional[str]:
    """Digests of disjoint rows added up (None if any is unknown)."""
    if any(d is None for d in digests):
        return None
    return f"{sum(int(d, 16) for d in digests) % DIGEST_MODULUS:064x}"


# ------------------------------------------------------------------------------------------------
# Training batches


def pack_rows(lengths: Sequence[int], budget: int, groups: int = 1) -> list[int]:
    """Rows per micro-batch when consecutive rows of ``lengths`` tokens fill micro-batches of at most
    ``budget`` tokens (a row is never split); then the largest micro-batches are halved until there
    are ``groups`` of them (or every one holds a single row)."""
    sizes, used = [], 0
    for n in lengths:
        if sizes and used + n <= budget:
            sizes[-1] += 1
            used += n
        else:
            sizes.append(1)
            used = n
    while sizes and len(sizes) < groups and max(sizes) > 1:
        i = sizes.index(max(sizes))
        sizes[i:i + 1] = [sizes[i] // 2, sizes[i] - sizes[i] // 2]
    return sizes


@dataclass
class StepBatch:
    """This rank's part of one optimizer step, and what the step needs to know about it without
    asking the device (``count_on_host``, before the batch is copied to the device)."""

    micro_batches: list  # collated: the model's keyword arguments, one dict per micro-batch
    state: LoaderState  # the global counters after the step
    global_batch: int  # sequences in the step, all ranks
    step_tokens: int  # tokens in the step, all ranks
    targets: list[int] = field(default_factory=list)  # labelled positions per micro-batch
    # Per micro-batch, what each target group's loss is averaged over (an objective mix's members;
    # one group otherwise): its labelled positions, or the collator's ``loss_tokens`` (MDLM).
    group_targets: list[list[int]] = field(default_factory=list)
    row_lengths: list[list[int]] = field(default_factory=list)  # real tokens of each row
    rows: list[int] = field(default_factory=list)  # rows per micro-batch
    # Each row's attention direction per micro-batch (an objective mix); None: the model's own.
    row_causal: list[Optional[list[bool]]] = field(default_factory=list)
    # Each row's prefix length per micro-batch (PrefixLM); None: no prefixes.
    row_prefix: list[Optional[list[int]]] = field(default_factory=list)
    rows_digest: str = "0" * 64  # of this rank's rows in the step (made on the host, by the loader)

    def count_on_host(self) -> "StepBatch":
        self.targets = [int((mb["labels"] != -100).sum()) for mb in self.micro_batches]
        self.group_targets = [list(mb.get("loss_tokens", mb.get("target_groups", [n])))
                              for mb, n in zip(self.micro_batches, self.targets)]
        self.row_lengths = [_row_lengths(mb) for mb in self.micro_batches]
        self.rows = [len(lengths) for lengths in self.row_lengths]
        self.row_causal = [_row_causal(mb, rows) for mb, rows in zip(self.micro_batches, self.rows)]
        self.row_prefix = [mb["prefix_lengths"].tolist() if "prefix_lengths" in mb else None
                           for mb in self.micro_batches]
        return self

    @property
    def tokens_before(self) -> int:
        """The phase's token clock when the step starts (what its LR is read at)."""
        return self.state.tokens - self.step_tokens

    def pin_memory(self) -> "StepBatch":  # the DataLoader pins what has this method
        # Tensors only: max_seqlen, target_groups, loss_tokens and a shared direction are host values.
        return replace(self, micro_batches=[{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                             for k, v in mb.items()}
                                            for mb in self.micro_batches])


def _row_causal(micro_batch: dict, rows: int) -> Optional[list[bool]]:
    causal = micro_batch.get("causal")
    if causal is None:
        return None
    return causal.tolist() if isinstance(causal, torch.Tensor) else [bool(causal)] * rows


def _row_lengths(micro_batch: dict) -> list[int]:
    if "cu_seqlens" in micro_batch:
        return torch.diff(micro_batch["cu_seqlens"]).tolist()
    mask = micro_batch.get("attention_mask")
    if mask is None:
        return [micro_batch["input_ids"].shape[1]] * micro_batch["input_ids"].shape[0]
    return mask.sum(dim=1).tolist()


class StepBatches(IterableDataset):
    """This rank's part of each optimizer step, from ``state`` on, forever, as ``StepBatch``es.

    ``sources``: a prepared folder or a list of (folder, weight). ``global_batch_at(tokens)`` gives
    the global batch in sequences after ``tokens`` tokens (batch-size warmup); it must be divisible
    by ``world_size``. ``truncate``: cut samples longer than ``seq_len`` instead of refusing the
    folder. ``pack``: micro-batches hold up to ``micro_batch_size * seq_len`` tokens of whole
    samples instead of ``micro_batch_size`` samples (unpadded collators only): fewer, fuller
    micro-batches when documents are short. Every rank of a step gets the same number of
    micro-batches (``pack_rows``), because a sharded model's forwards are collective."""

    def __init__(self, sources, *, split: str = "train", seq_len: int, collator: Callable,
                 global_batch_at: Callable[[int], int], micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, phase="0",
                 state: Optional[LoaderState] = None, truncate: bool = False,
                 pack: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1 or seq_len < 2:
            raise ValueError("micro_batch_size must be >= 1 and seq_len >= 2")
        if pack and not getattr(collator, "unpadded", True):
            raise ValueError("pack=True needs an unpadded collator (padded rows cannot keep "
                             "documents apart)")
        self.sources = normalize_sources(sources)
        ids = getattr(collator, "ids", None)
        self.order = None
        if source_format(self.sources[0]) == "order":  # replay a released data order
            if len(self.sources) > 1 or split != "train":
                raise ValueError("a data order (format=order) replays the training rows: it must "
                                 "be the phase's only source")
            self.order = open_released_order(self.sources[0], ids)
            self.order.check(getattr(collator, "vocab_size", None) or self.order.max_id + 1, seq_len)
            self.order_batches = self.sources[0].order_batches
            self.folder_ends = self.order.folder_ends()
        else:
            self.splits = open_splits(self.sources, split, seq_len, truncate, ids=ids)
            if ids is not None:
                check_prepared_tokenizer(self.splits, ids,
                                         vocab_size=getattr(collator, "vocab_size", None))
            self.mixture = Mixture(self.splits, [s.weight for s in self.sources], seed=seed,
                                   phase=phase, seq_len=seq_len)
        self.seq_len, self.truncate, self.pack = seq_len, truncate, pack
        self.close_rows = bool(getattr(collator, "close_rows", False))
        self.sep = None if ids is None else ids.sep
        self.collator = collator
        self.global_batch_at = global_batch_at
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.start = state if state is not None else LoaderState()
        self.global_batch(self.start)  # a bad batch size fails now, not in a worker

    def global_batch(self, state: LoaderState) -> int:
        """Sequences in the step that starts at ``state`` (all ranks); 0 once a released order is
        used up. A released order's last step takes the rows that are left (as many as the ranks
        can share evenly)."""
        if self.order is not None and self.order_batches == "released":
            if state.step >= self.order.steps:
                return 0
            batch = self.order.released_step(state.step)[1]
            what = (f"released step {self.order.first_step + state.step + 1} has {batch} rows, "
                    "which")
            fix = "; or group the rows by this run's schedule (order_batches: schedule)"
        else:
            batch = int(self.global_batch_at(state.tokens))
            what, fix = f"global batch {batch} (at {state.tokens:,} tokens)", ""
        if batch < 1 or batch % self.world_size:
            raise ValueError(
                f"{what} is not a positive multiple of the world size {self.world_size}: every "
                "rank must get the same number of sequences. Choose a global batch (and "
                f"batch-warmup sizes) divisible by the number of devices{fix}")
        if self.order is not None and self.order_batches == "schedule":
            left = self.order.rows - state.samples
            batch = min(batch, left - left % self.world_size)
        return batch

    def plan(self) -> Iterator[tuple[LoaderState, int, int]]:
        """(state before the step, global batch, step tokens) of every step from the start on;
        a released order ends when its rows are used up."""
        state = self.start
        while True:
            batch = self.global_batch(state)
            if batch == 0:
                return
            if self.order is None:
                step_tokens = int(self.mixture.lengths(state.samples, batch).sum())
            else:
                step_tokens = int(self.order.lengths(state.samples, batch).sum())
                self.check_folder_ends(state, batch)
            yield state, batch, step_tokens
            state = LoaderState(state.step + 1, state.samples + batch, state.tokens + step_tokens)

    def check_folder_ends(self, state: LoaderState, batch: int) -> None:
        """A released folder is the data between two of Ettin's checkpoints: where one ends inside
        this step, the run's token clock (kept across resumes) must have consumed exactly the
        released folders' tokens up to there."""
        for folder, end in self.folder_ends:
            if state.samples < end <= state.samples + batch:
                consumed = state.tokens + int(self.order.lengths(state.samples, end - state.samples).sum())
                released = self.order.tokens_before(end)
                if consumed != released:
                    raise ValueError(
                        f"at the end of the released folder {folder} (step {state.step + 1} of this "
                        f"phase) the run has consumed {consumed:,} tokens but the released folders "
                        f"up to it hold {released:,}: the run resumed from a checkpoint of another "
                        "data order (other folders or from_step); start the phase again")
                log.info("released folder %s ends in step %d: %s tokens, as released", folder,
                         state.step + 1, f"{consumed:,}")

    def rank_samples(self, state: LoaderState, batch: int) -> list[tuple[int, np.ndarray]]:
        share = batch // self.world_size
        first = state.samples + self.rank * share
        if self.order is not None:
            samples = list(zip(range(first, first + share), self.order.read(first, share)))
        else:
            samples = self.mixture.samples(first, share)
        return [(p, fit_row(t, self.seq_len, self.close_rows, self.sep)) for p, t in samples]

    def micro_batches(self, state: LoaderState, batch: int, samples: list) -> list[list]:
        if not self.pack:
            m = self.micro_batch_size
            return [samples[i:i + m] for i in range(0, len(samples), m)]
        # Every rank packs every rank's share from the lengths alone (no communication) and splits
        # its own into as many micro-batches as the rank that needs the most.
        lengths = (self.mixture if self.order is None else self.order).lengths(state.samples, batch)
        budget, share = self.micro_batch_size * self.seq_len, batch // self.world_size
        most = max(len(pack_rows(lengths[r * share:(r + 1) * share], budget))
                   for r in range(self.world_size))
        sizes = pack_rows(lengths[self.rank * share:(self.rank + 1) * share], budget, groups=most)
        bounds = np.cumsum([0, *sizes])
        return [samples[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for state, batch, step_tokens in self.plan():
            if (state.step - self.start.step) % workers != worker:
                continue
            samples = self.rank_samples(state, batch)
            # The collator of this step: a scheduled rate (mask-rate annealing) is read at the
            # phase's token clock before the step.
            collate = self.collator.at_tokens(state.tokens) if hasattr(self.collator, "at_tokens") \
                else self.collator
            micro = [collate(group) for group in self.micro_batches(state, batch, samples)]
            after = LoaderState(state.step + 1, state.samples + batch, state.tokens + step_tokens)
            yield StepBatch(micro, after, batch, step_tokens,
                            rows_digest=rows_digest(samples, self.seq_len))


# ------------------------------------------------------------------------------------------------
# Validation batches


class ValidationBatches:
    """A fixed set of validation batches, the same at every evaluation: the sources' validation
    splits in stored order (for a mixture, each source contributes in proportion to its weight),
    at most ``batch_size * max_batches`` samples in all, whatever the world size (so validation
    figures compare across GPU counts); rank r takes every ``world_size``-th of them, ``batch_size``
    samples per batch. Iterable any number of times; collated on the fly."""

    def __init__(self, sources, *, seq_len: int, collator: Callable, batch_size: int,
                 max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1,
                 truncate: bool = False, max_samples: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.sources = [s for s in normalize_sources(sources) if source_format(s) != "order"]
        self.order, self.mine, self.positions, self.batch_size = [], [], [], batch_size
        if not self.sources:  # a replayed phase: the released order has no validation split
            import logging

            logging.getLogger("ettin").warning("a replayed data order has no validation split: "
                                               "no validation batches")
            return
        ids = getattr(collator, "ids", None)
        self.splits = open_splits(self.sources, "validation", seq_len, truncate, ids=ids)
        if ids is not None:
            check_prepared_tokenizer(self.splits, ids, vocab_size=getattr(collator, "vocab_size", None))
        sizes = np.array([len(s) for s in self.splits], dtype=np.int64)
        if not sizes.sum():
            raise ValueError(
                f"the validation split of {', '.join(str(s.root) for s in self.splits)} is empty "
                "(prepared with validation_fraction=0, or too little text); prepare with "
                "validation_fraction > 0, or turn validation off"
            )
        total = int(sizes.sum())
        if max_batches is not None:
            total = min(total, batch_size * max_batches)
        if max_samples is not None:  # a fixed set whatever the batch size
            total = min(total, max_samples)
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        counts = np.minimum(largest_remainder(weights / weights.sum(), total), sizes)
        # What a capped source cannot give goes to the others, in order.
        for i in range(len(counts)):
            missing = total - int(counts.sum())
            if missing <= 0:
                break
            counts[i] += min(missing, int(sizes[i] - counts[i]))
        self.order = [(int(s), int(i)) for s, c in enumerate(counts) for i in range(int(c))]
        self.seq_len = seq_len
        self.close_rows = bool(getattr(collator, "close_rows", False))
        self.sep = None if ids is None else ids.sep
        self.collator, self.batch_size = collator, batch_size
        self.mine = self.order[rank::world_size]
        self.positions = list(range(rank, len(self.order), world_size))

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        for start in range(0, len(self.mine), self.batch_size):
            samples = []
            for position, (s, i) in zip(self.positions[start:start + self.batch_size],
                                        self.mine[start:start + self.batch_size]):
                tokens = fit_row(self.splits[s].tokens(i), self.seq_len, self.close_rows, self.sep)
                samples.append((position, tokens))
            yield self.collator(samples)


def validation_batches(sources, *, seq_len: int, collator: Callable, batch_size: int,
                       max_batches: Optional[int] = None, rank: int = 0, world_size: int = 1,
                       truncate: bool = False, max_samples: Optional[int] = None) -> list[dict]:
    """``list(ValidationBatches(...))``."""
    return list(ValidationBatches(sources, seq_len=seq_len, collator=collator,
                                  batch_size=batch_size, max_batches=max_batches, rank=rank,
                                  world_size=world_size, truncate=truncate, max_samples=max_samples))
