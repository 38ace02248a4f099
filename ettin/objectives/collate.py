"""Collators: a list of ``(global sample index, tokens)`` -> exactly the model's keyword arguments.

* padded: ``{input_ids [B, T], attention_mask [B, T], labels [B, T]}`` (right padding);
* unpadded (default): ``{input_ids [N], cu_seqlens int32 [B + 1], max_seqlen, labels [N],
  target_index [n_targets]}``: the rows concatenated, one sequence each, so attention never crosses
  a row. This is also the packed form: a micro-batch is one stream of documents
  (StepBatches(pack=True) fills micro-batches by tokens instead of rows). ``max_seqlen`` (an int)
  and ``target_index`` (int64 stream positions whose label is not -100, ascending) are computed
  here on the host, so the model's forward needs no host-device sync to find them.

Labels: -100 is "no target", and the label at position i is the target predicted FROM position i,
so the model and the loss are the same for every objective:

* CLM: ``label[i] = token[i + 1]`` within the row; -100 on the row's last position. A prepared row
  holds one document (``[CLS] ...`` with ``[SEP]`` only where the document really ends), so nothing
  is predicted across documents, and ``[SEP]`` (EOS) is a target only at a true document end.
* MLM: each non-special token is selected with ``mask_rate``; of the selected, 80 % become
  ``[MASK]``, 10 % a random non-special token, 10 % stay; ``label = original`` where selected.
* MNTP (LLM2Vec): MLM's masking, but a masked token at j is the target of position j - 1.
* PrefixLM (T5's prefix LM objective; UL2's S-denoiser): a row of n tokens is split after a prefix of
  p tokens, p drawn uniformly from 1 .. n - 1 per row; CLM's labels on the tokens after the prefix
  only (``label[i] = token[i + 1]`` for i >= p - 1). The batch adds ``prefix_lengths`` (int64 [rows]):
  the model attends bidirectionally over each row's prefix and causally after it.
* MDLM (masked diffusion): each row draws its own mask rate t from (eps, 1] (``MDLMCollator``);
  each non-special token becomes ``[MASK]`` with probability t (always [MASK]: no 80/10/10), every
  masked position a target. Its batches add ``target_weight`` (1/t of each target's row, in
  ``target_index`` order) and ``loss_tokens`` (the maskable tokens of the rows, per target group):
  the loss is the weighted sum over targets divided by the tokens, the MDLM bound per token.

Encoder rows (MLM, MNTP) are closed with ``[SEP]`` when the chunk does not end a document
(``close_rows``), so every encoder row reads ``[CLS] ... [SEP]``; the prepared middle chunks leave
room for it. Decoder rows are used as prepared: BOS (``[CLS]``) first, EOS only at a document end.

Every random choice derives from (seed, global sample index) alone, so a resumed run masks exactly
as an uninterrupted one, whatever the number of workers or ranks.

An objective mix (``MixedCollator``) collates each row with the collator of the objective that
``mix_choice`` draws for it from (seed, global sample index), and adds each row's attention direction
(``causal``; and ``prefix_lengths`` when a member draws prefixes) and the targets of each objective
(``target_groups``) for the model (and, with an MDLM member, every target's weight and each
objective's ``loss_tokens``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ettin.data.tokenizer import SpecialIds

IGNORE_INDEX = -100
Sample = tuple  # (global sample index: int, tokens: np.ndarray)


def batch_tensors(rows: Sequence[np.ndarray], labels: Sequence[np.ndarray], pad_id: int,
                  unpadded: bool, weights: Optional[Sequence[float]] = None) -> dict:
    """Rows and their labels (int64 arrays of equal lengths) as the model's keyword arguments;
    ``weights`` (one per row), when given, become ``target_weight``: each target's row weight, in
    ``target_index`` order (unpadded rows only)."""
    if not rows:
        raise ValueError("cannot collate an empty list of samples")
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if lengths.min() < 1:
        raise ValueError("cannot collate an empty row")
    if unpadded:
        cu_seqlens = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        flat_labels = np.concatenate(labels)
        target_index = np.flatnonzero(flat_labels != IGNORE_INDEX)
        batch = {
            "input_ids": torch.from_numpy(np.concatenate(rows)),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(lengths.max()),
            "labels": torch.from_numpy(flat_labels),
            "target_index": torch.from_numpy(target_index),
        }
        if weights is not None:
            row_of_target = np.searchsorted(cu_seqlens[1:], target_index, side="right")
            batch["target_weight"] = torch.from_numpy(
                np.asarray(weights, dtype=np.float32)[row_of_target])
        return batch
    if weights is not None:
        raise ValueError("target weights (MDLM) need unpadded rows")
    width = int(lengths.max())
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    label_grid = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = row
        label_grid[i, : len(row)] = label
        attention_mask[i, : len(row)] = 1
    return {"input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(label_grid)}


@dataclass(frozen=True)
class MaskRate:
    """A phase's mask rate: ``start`` at its first token, ``end`` after ``tokens`` tokens, linear in
    the phase's tokens in between (mmBERT's annealing). A step's rate is read at the phase's token
    clock before the step, which the loader restores on resume, so masks stay a function of
    (seed, global sample index) within a resumed phase."""

    start: float
    end: float
    tokens: int

    def __post_init__(self) -> None:
        for rate in (self.start, self.end):
            if not 0.0 < rate < 1.0:
                raise ValueError(f"mask_rate={rate} must be in (0, 1)")
        if self.tokens < 1:
            raise ValueError(f"a mask-rate schedule needs a positive length (tokens={self.tokens})")

    def at(self, tokens_before: int) -> float:
        return self.start + (self.end - self.start) * min(tokens_before / self.tokens, 1.0)

    @property
    def mean(self) -> float:
        """The phase's average rate (linear: the midpoint), for target and FLOP estimates."""
        return (self.start + self.end) / 2


class _Collator:
    ids: SpecialIds
    unpadded: bool
    vocab_size: Optional[int]  # the tokenizer's size: larger ids are refused (None: not checked)
    close_rows = False  # whether rows get a closing [SEP] (encoders): one token more per row
    draws_prefix = False  # whether rows have a prefix seen bidirectionally (PrefixLM)

    @property
    def pad_id(self) -> int:
        return self.ids.pad if self.ids.pad is not None else self.ids.sep

    def row(self, tokens) -> np.ndarray:
        row = np.asarray(tokens).astype(np.int64)
        if self.vocab_size is not None and len(row) and row.max() >= self.vocab_size:
            raise ValueError(
                f"token id {int(row.max())} is outside the tokenizer's {self.vocab_size} ids: the "
                "data was prepared with another tokenizer; prepare it again with this one"
            )
        if self.close_rows and (len(row) == 0 or row[-1] != self.ids.sep):
            row = np.append(row, self.ids.sep)
        return row

    def at_tokens(self, tokens_before: int) -> "_Collator":
        """The collator of the step that starts after ``tokens_before`` tokens of the phase (the
        loader asks each step): the same one unless a rate changes over the phase."""
        return self

    def example(self, index: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        """(model input, labels) of one row; a function of (index, tokens) and the settings only."""
        raise NotImplementedError

    def prefix_length(self, index: int, length: int) -> int:
        """The prefix of row ``index`` (``length`` tokens) that all its queries see (PrefixLM); 0: none."""
        return 0

    @staticmethod
    def prefix_choices(length: int) -> range:
        """The prefix lengths a row of ``length`` tokens draws from, equally likely (FLOP estimates)."""
        return range(0, 1)

    # Whether targets carry a row weight and the loss is averaged over tokens rather than targets
    # (MDLM): batches then hold ``target_weight`` and ``loss_tokens``.
    weighted = False

    def loss_terms(self, index: int, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(weight of the row's targets, what the row adds to the loss's denominator)."""
        return 1.0, int((labels != IGNORE_INDEX).sum())

    def __call__(self, samples: Sequence[Sample]) -> dict:
        pairs = [self.example(index, tokens) for index, tokens in samples]
        if not self.weighted:
            return batch_tensors([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id, self.unpadded)
        terms = [self.loss_terms(index, *p) for (index, _), p in zip(samples, pairs)]
        batch = batch_tensors([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id, self.unpadded,
                              weights=[w for w, _ in terms])
        batch["loss_tokens"] = [sum(n for _, n in terms)]
        return batch


class CLMCollator(_Collator):
    """Next-token prediction within each row (a row is one document's chunk). ``vocab_size``: the
    tokenizer's size (``len(tokenizer)``), so data prepared with another tokenizer is refused."""

    def __init__(self, ids: SpecialIds, unpadded: bool = True, *, vocab_size: Optional[int] = None) -> None:
        self.ids, self.unpadded = ids, unpadded
        self.vocab_size = None if vocab_size is None else int(vocab_size)

    def labels(self, row: np.ndarray) -> np.ndarray:
        labels = np.empty_like(row)
        labels[:-1] = row[1:]
        labels[-1] = IGNORE_INDEX
        return labels

    def example(self, index: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        row = self.row(tokens)
        return row, self.labels(row)


# A stream of its own for each row's prefix length: never the masks' nor the mix's.
PREFIX_STREAM = 0x707265


class PrefixLMCollator(CLMCollator):
    """PrefixLM (T5, arXiv 1910.10683 section 3.3.1: "a random point to split it into prefix and
    target"; UL2's S-denoiser, arXiv 2205.05131): the prefix length of each row is drawn uniformly
    from 1 .. n - 1 by (seed, global sample index) alone, so [CLS] is always in the prefix and at
    least one token is predicted; rows of one token have no target."""

    draws_prefix = True

    def __init__(self, ids: SpecialIds, unpadded: bool = True, *, vocab_size: Optional[int] = None,
                 seed: int) -> None:
        super().__init__(ids, unpadded, vocab_size=vocab_size)
        self.seed = int(seed)

    @staticmethod
    def prefix_choices(length: int) -> range:
        return range(1, length) if length >= 2 else range(length, length + 1)

    def prefix_length(self, index: int, length: int) -> int:
        choices = self.prefix_choices(length)
        return int(np.random.default_rng([PREFIX_STREAM, self.seed, int(index)]).integers(choices.start,
                                                                                        choices.stop))

    def example(self, index: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        row = self.row(tokens)
        labels = self.labels(row)
        labels[: self.prefix_length(index, len(row)) - 1] = IGNORE_INDEX  # the prefix predicts nothing
        return row, labels

    def __call__(self, samples: Sequence[Sample]) -> dict:
        batch = super().__call__(samples)
        # Rows are used as prepared (never closed), so a row's length is its tokens'.
        batch["prefix_lengths"] = torch.tensor([self.prefix_length(index, len(tokens))
                                                for index, tokens in samples], dtype=torch.int64)
        return batch


class MLMCollator(_Collator):
    """Masked language modelling (BERT's 80/10/10), masks seeded by (seed, global sample index).

    ``vocab_size`` is the tokenizer's size (``len(tokenizer)``): random replacements are drawn
    uniformly from its non-special ids (never [CLS]/[SEP]/[PAD]/[MASK]/[UNK] nor unused ids)."""

    shift = 0  # MNTP: the target of a masked token j sits at position j - 1
    close_rows = True

    def __init__(self, ids: SpecialIds, vocab_size: int, mask_rate: Union[float, MaskRate], seed: int,
                 unpadded: bool = True, close_rows: Optional[bool] = None) -> None:
        # A fixed rate is a schedule that stays put; ``mask_rate`` is the rate of the current step.
        self.schedule = mask_rate if isinstance(mask_rate, MaskRate) else MaskRate(mask_rate, mask_rate, 1)
        mask_rate = self.schedule.start
        if ids.mask is None:
            raise ValueError("the tokenizer has no [MASK] token; masked objectives need one "
                             "(add one, or train with objective=clm)")
        self.ids, self.mask_rate, self.seed, self.unpadded = ids, mask_rate, int(seed), unpadded
        if close_rows is not None:
            self.close_rows = close_rows
        self.vocab_size = int(vocab_size)
        special = np.zeros(self.vocab_size, dtype=bool)
        special[[i for i in ids.all if 0 <= i < self.vocab_size]] = True
        self.is_special = special
        self.replacements = np.flatnonzero(~special)  # random replacements are never special
        if not len(self.replacements):
            raise ValueError("the vocabulary has no non-special token to draw replacements from")

    def at_tokens(self, tokens_before: int) -> "MLMCollator":
        if self.schedule.start == self.schedule.end:
            return self
        step = copy.copy(self)  # shares the vocabulary tables
        step.mask_rate = self.schedule.at(tokens_before)
        return step

    def example(self, index: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        """(model input, labels) of one row; a function of (seed, index, tokens) only."""
        row = self.row(tokens)
        rng = np.random.default_rng([self.seed, int(index)])
        n = len(row)
        selected = (rng.random(n) < self.mask_rate) & ~self.is_special[row]
        action = rng.random(n)
        random_ids = self.replacements[rng.integers(0, len(self.replacements), n)]
        inputs = row.copy()
        inputs[selected & (action < 0.8)] = self.ids.mask
        swap = selected & (action >= 0.8) & (action < 0.9)
        inputs[swap] = random_ids[swap]
        labels = np.where(selected, row, IGNORE_INDEX)
        if self.shift:
            labels = np.append(labels[1:], IGNORE_INDEX)
        return inputs, labels


class MDLMCollator(MLMCollator):
    """Masked diffusion (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025): row ``index`` draws its
    mask rate t from (eps, 1] and masks each non-special token with probability t, always with
    [MASK] (the forward process of absorbing-state diffusion; no 80/10/10); every masked position is
    a target, weighted 1/t, and the row adds its maskable tokens to ``loss_tokens``, so the step's
    loss (weighted sum / tokens) is the continuous-time MDLM bound per token for the linear schedule
    alpha_t = 1 - t.

    t is MDLM's low-discrepancy (stratified, "antithetic") sampler over blocks of ``STRATA``
    consecutive global sample indices: index k falls in stratum j = k mod STRATA and draws
    u = (j + v) / STRATA with v ~ U[0, 1) seeded by (seed, k); t = 1 - (1 - eps) u. So t is
    uniform on (eps, 1] marginally, any STRATA consecutive rows (a step's rows are consecutive) hold
    one t in each 1/STRATA-wide stratum, and t is a function of (seed, index) alone, as every mask."""

    STRATA = 8  # the smoke recipe's global batch; larger batches hold whole blocks
    EPS = 1e-3  # MDLM's sampling_eps
    weighted = True

    def __init__(self, ids: SpecialIds, vocab_size: int, seed: int, unpadded: bool = True,
                 eps: float = EPS) -> None:
        if not unpadded:
            raise ValueError("the MDLM collator collates unpadded rows (its target weights index the "
                             "flat stream)")
        # MLM's fixed rate is never read: each row's rate is ``rate(index)``.
        super().__init__(ids, vocab_size, mask_rate=0.5, seed=seed, unpadded=unpadded)
        self.eps = float(eps)

    def rate(self, index: int) -> float:
        """The mask rate t of row ``index``."""
        stratum = int(index) % self.STRATA
        v = np.random.default_rng([self.seed, int(index), self.STRATA]).random()
        return 1.0 - (1.0 - self.eps) * (stratum + v) / self.STRATA

    def example(self, index: int, tokens) -> tuple[np.ndarray, np.ndarray]:
        row = self.row(tokens)
        rng = np.random.default_rng([self.seed, int(index)])
        selected = (rng.random(len(row)) < self.rate(index)) & ~self.is_special[row]
        return np.where(selected, self.ids.mask, row), np.where(selected, row, IGNORE_INDEX)

    def loss_terms(self, index: int, inputs: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(the row's target weight 1/t, its maskable tokens: unmasked non-special ones + targets)."""
        tokens = int((~self.is_special[inputs]).sum() + (labels != IGNORE_INDEX).sum())
        return 1.0 / self.rate(index), tokens


class MNTPCollator(MLMCollator):
    """Masked next-token prediction (LLM2Vec): MLM masking, but a masked token at position j is the
    target of position j - 1 (bidirectional attention). [CLS] at 0 is never masked, so every
    target has a position before it."""

    shift = 1


# A stream of its own for the objective of each row: never the masks' ``[seed, index]`` stream.
MIX_STREAM = 0x6D6978


def mix_choice(seed: int, index: int, cumulative: np.ndarray) -> int:
    """The member of a mix that row ``index`` trains: a uniform draw seeded by (seed, index) alone,
    against the members' cumulative normalised weights, so every rank, worker and resume agrees."""
    draw = np.random.default_rng([MIX_STREAM, int(seed), int(index)]).random()
    return min(int(np.searchsorted(cumulative, draw, side="right")), len(cumulative) - 1)


class MixedCollator:
    """Each row collated by one member collator, chosen from its global sample index (``mix_choice``
    with ``weights``), in one batch: the model's keyword arguments plus ``causal`` (each row's
    direction from ``causal``; a bool when the rows share one, so the model keeps its uniform fast
    paths), ``prefix_lengths`` when a member draws prefixes (PrefixLM; 0 for the other rows) and
    ``target_groups`` (the targets of each member, ``target_index`` listing them member
    by member). Unpadded rows only (target_index is the flat stream's)."""

    def __init__(self, collators: Sequence[_Collator], weights: Sequence[float],
                 causal: Sequence[bool], seed: int) -> None:
        if not all(c.unpadded for c in collators):
            raise ValueError("an objective mix collates unpadded rows only")
        weights = np.asarray(weights, dtype=np.float64)
        self.collators, self.directions, self.seed = list(collators), list(causal), int(seed)
        self.cumulative = np.cumsum(weights / weights.sum())
        self.ids, self.unpadded = collators[0].ids, True
        self.vocab_size = collators[0].vocab_size
        # The loader cuts full rows one token short when any member closes its rows with [SEP].
        self.close_rows = any(c.close_rows for c in collators)

    def choice(self, index: int) -> int:
        return mix_choice(self.seed, index, self.cumulative)

    def at_tokens(self, tokens_before: int) -> "MixedCollator":
        step = copy.copy(self)
        step.collators = [c.at_tokens(tokens_before) for c in self.collators]
        return step

    def __call__(self, samples: Sequence[Sample]) -> dict:
        members = [self.choice(index) for index, _ in samples]
        pairs = [self.collators[m].example(index, tokens) for m, (index, tokens) in zip(members, samples)]
        weighted = any(c.weighted for c in self.collators)
        terms = [self.collators[m].loss_terms(index, *p) for m, (index, _), p in zip(members, samples, pairs)]
        batch = batch_tensors([p[0] for p in pairs], [p[1] for p in pairs], self.collators[0].pad_id,
                              unpadded=True, weights=[w for w, _ in terms] if weighted else None)
        starts = batch["cu_seqlens"][:-1].numpy()
        member_of_target = np.asarray(members)[np.searchsorted(starts, batch["target_index"].numpy(),
                                                               side="right") - 1]
        order = np.argsort(member_of_target, kind="stable")  # member by member, each ascending
        batch["target_index"] = batch["target_index"][torch.from_numpy(order)]
        if weighted:
            batch["target_weight"] = batch["target_weight"][torch.from_numpy(order)]
            batch["loss_tokens"] = np.bincount(members, weights=[n for _, n in terms],
                                               minlength=len(self.collators)).astype(int).tolist()
        batch["target_groups"] = np.bincount(member_of_target, minlength=len(self.collators)).tolist()
        directions = [self.directions[m] for m in members]
        batch["causal"] = directions[0] if len(set(directions)) == 1 else torch.tensor(directions)
        if any(c.draws_prefix for c in self.collators):
            batch["prefix_lengths"] = torch.tensor(
                [self.collators[m].prefix_length(index, len(row))
                 for m, (index, _), (row, _) in zip(members, samples, pairs)], dtype=torch.int64)
        return batch
