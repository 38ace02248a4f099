"""The objectives, one registry entry each. Choosing one selects the attention pattern (``Attention``),
the collator (the labels), the metrics and what an export of the model is; the loss is the same
cross-entropy over labelled positions for all of them.

A new objective is one ``register(Objective(...))`` with its collator class (ettin.objectives.collate
holds the collators). A phase trains an ``ObjectiveMix``: one objective, or several with weights
(GPT-BERT's 15 MLM rows to 1 CLM row), each row of a batch training one of them with its own attention
direction. May import: ettin.data (tokenizer ids); nothing of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Sequence

from ettin.objectives.collate import (CLMCollator, MaskRate, MDLMCollator, MixedCollator, MLMCollator,
                                      MNTPCollator, PrefixLMCollator)

SIDES = {"encoder": "ModernBertForMaskedLM", "decoder": "ModernBertDecoderForCausalLM"}


class Attention(Enum):
    """Which keys of its row a query sees. The model takes it as ``causal`` (and, for PREFIX, each
    row's ``prefix_lengths`` from the collator); ettin.model.modernbert.allowed_pairs is the rule."""

    BIDIRECTIONAL = "bidirectional"  # every key of the row
    CAUSAL = "causal"  # itself and the keys before it
    PREFIX = "prefix"  # causal, and every key of the row's prefix (its length drawn per row)

    @property
    def causal(self) -> bool:
        """The model's ``causal`` for this pattern (a prefix widens causal attention)."""
        return self is not Attention.BIDIRECTIONAL

    @property
    def side(self) -> Optional[str]:
        """The transformers model that attends this way: None where none does (a prefix)."""
        return {Attention.BIDIRECTIONAL: "encoder", Attention.CAUSAL: "decoder"}.get(self)


class ExportRefused(ValueError):
    """transformers has no class that attends as the model was trained to; the message names the choices."""


@dataclass(frozen=True)
class Objective:
    name: str
    attention: Attention
    masked: bool  # the collator masks tokens at a rate (MLM, MNTP); CLM predicts every next token
    # The output at position i predicts token i+1 (CLM; MNTP reads a masked token one position to
    # the left) rather than token i (MLM): recorded in exports so users read the outputs right.
    predicts_next_token: bool
    collator_class: Callable
    description: str
    # The loss is a bound (MDLM): targets weighted 1/t by the collator, averaged over the rows'
    # tokens; its second figure is the perplexity bound exp(loss), not masked accuracy.
    bound: bool = False

    @property
    def causal(self) -> bool:
        return self.attention.causal

    @property
    def side(self) -> Optional[str]:
        """``decoder`` for causal attention, ``encoder`` for bidirectional: what a pair pairs and what
        an export is; None when transformers has no such model (a prefix)."""
        return self.attention.side

    def export_class(self, export_as: Optional[str] = None) -> str:
        """The transformers class an export of a model trained with this objective loads as: its
        side's, or ``export_as``'s (a mix's side, or the choice for an objective without a side)."""
        side = export_as or self.side
        if side is None:
            raise ExportRefused(
                f"objective {self.name} attends bidirectionally over a prefix and causally after it "
                f"({self.attention.value} attention), which neither ModernBertForMaskedLM (bidirectional) nor "
                "ModernBertDecoderForCausalLM (causal) can express, so an export would not compute what "
                "was trained. Choose the class it is exported as: train with export_as=encoder or "
                "export_as=decoder")
        return SIDES[side]

    def collator(self, tokenizer, *, mask_rate: float | MaskRate, seed: int, unpadded: bool = True):
        """This objective's collator; rows are unpadded (no compute spent on padding) by default.
        ``mask_rate``: a fixed rate, or a phase's schedule (``MaskRate``)."""
        from ettin.data.tokenizer import special_ids

        ids = special_ids(tokenizer)
        if self.bound:  # each row draws its own mask rate
            return self.collator_class(ids, vocab_size=len(tokenizer), seed=seed, unpadded=unpadded)
        if self.masked:
            return self.collator_class(ids, vocab_size=len(tokenizer), mask_rate=mask_rate, seed=seed,
                                       unpadded=unpadded)
        if self.attention is Attention.PREFIX:  # the prefix lengths are drawn
            return self.collator_class(ids, unpadded=unpadded, vocab_size=len(tokenizer), seed=seed)
        return self.collator_class(ids, unpadded=unpadded, vocab_size=len(tokenizer))

    def targets_per_row(self, seq_len: int, mask_rate: float) -> float:
        """Labelled positions of a full row (for FLOP estimates); MDLM: at its mean rate; a prefix of
        1 .. n - 1 tokens leaves n / 2 targets on average."""
        if self.bound:
            mask_rate = (1 + MDLMCollator.EPS) / 2
        if self.masked:
            return round(mask_rate * seq_len)
        return seq_len / 2 if self.attention is Attention.PREFIX else seq_len

    def prefix_choices(self, seq_len: int) -> range:
        """The prefix lengths a full row draws from, equally likely (0: none; for FLOP estimates)."""
        return self.collator_class.prefix_choices(seq_len)

    @property
    def _second_metric(self) -> str:
        return "perplexity_bound" if self.bound else "masked_accuracy" if self.masked else "perplexity"

    def metric_names(self, prefix: str) -> list[str]:
        return [f"{prefix}/loss", f"{prefix}/{self._second_metric}"]

    def train_metric_names(self) -> list[str]:
        """Training's figures: the metrics, and for masked objectives at a set rate the realised
        mask rate."""
        return self.metric_names("train") + (["train/mask_rate"] if self.masked and not self.bound else [])

    def metrics(self, prefix: str, loss: float, correct: float, targets: float) -> dict[str, float]:
        """``{prefix}/loss`` (mean over target tokens; MDLM: the bound, per token) and the objective's
        second figure: masked accuracy for masked objectives, perplexity for CLM, the perplexity
        bound exp(loss) for MDLM."""
        out = {f"{prefix}/loss": loss}
        if self.masked and not self.bound:
            out[f"{prefix}/masked_accuracy"] = correct / max(targets, 1.0)
        else:
            out[f"{prefix}/{self._second_metric}"] = math.exp(min(loss, 30.0))
        return out


class MixError(ValueError):
    """An objective mix that cannot train; the message names the fix."""


@dataclass(frozen=True)
class ObjectiveMix:
    """The objectives a phase trains and their weights; one objective is a mix of one.

    Each row of a batch trains one member, drawn from its global sample index with the normalised
    weights (``collate.mix_choice``), so the assignment is the same on every rank and after a
    resume. The loss is each member's mean over its targets, summed with the normalised weights.
    ``side`` is what the model is when it is not training a row: its default direction and the
    transformers class an export loads as (``export_as``, or the side all members share; None when
    no member has a side and none was chosen: such a model is not exported)."""

    members: tuple[Objective, ...]
    given_weights: tuple[float, ...]  # as configured (for display)
    side: Optional[str]

    @classmethod
    def of(cls, weights: dict[str, float], export_as: Optional[str] = None) -> "ObjectiveMix":
        if not weights:
            raise MixError("an objective mix needs at least one objective, e.g. {mlm: 15, clm: 1}")
        for name, weight in weights.items():
            if name not in OBJECTIVES:
                raise MixError(f"objective {name!r} of the mix is unknown; choose from "
                               f"{', '.join(OBJECTIVES)}")
            if not weight > 0:
                raise MixError(f"objective {name!r} has weight {weight} in the mix; weights must be "
                               "positive (leave an objective out rather than weigh it 0)")
        members = tuple(OBJECTIVES[name] for name in weights)
        sides = {m.side for m in members} - {None}
        sideless = any(m.side is None for m in members)  # any side is a choice, none the default
        if export_as is not None and export_as not in SIDES:
            raise MixError(f"export_as={export_as!r}; choose one of {', '.join(SIDES)}")
        if export_as is not None and export_as not in sides and not sideless:
            raise MixError(f"export_as={export_as} but no objective of {cls._describe(weights)} is a "
                           f"{export_as} objective; choose export_as={' or '.join(sorted(sides))}")
        if export_as is None and len(sides) > 1:
            raise MixError(f"the mix {cls._describe(weights)} trains both an encoder objective and a "
                           "decoder objective: set export_as=encoder or export_as=decoder to say "
                           "which model it is (its export class)")
        side = export_as or (sides.pop() if sides and not sideless else None)
        return cls(members, tuple(float(w) for w in weights.values()), side)

    @staticmethod
    def _describe(weights: dict[str, float]) -> str:
        return "+".join(f"{name}:{weight:g}" for name, weight in weights.items())

    @property
    def name(self) -> str:
        """``mlm`` for one objective, ``mlm:15+clm:1`` for a mix."""
        if not self.mixed:
            return self.members[0].name
        return self._describe({m.name: w for m, w in zip(self.members, self.given_weights)})

    @property
    def mixed(self) -> bool:
        return len(self.members) > 1

    @property
    def weights(self) -> tuple[float, ...]:
        """Normalised: they sum to 1."""
        total = sum(self.given_weights)
        return tuple(w / total for w in self.given_weights)

    @property
    def objective(self) -> Objective:
        """What the model is (its direction, its recorded objective): the heaviest member on the
        mix's side, else the heaviest member."""
        on_side = [m for m in self.members if m.side == self.side] or list(self.members)
        return max(on_side, key=lambda m: self.given_weights[self.members.index(m)])

    @property
    def export_class(self) -> str:
        """The transformers class the model is exported as (``ExportRefused`` where none is right)."""
        return self.objective.export_class(self.side)

    def collator(self, tokenizer, *, mask_rate: float | MaskRate, seed: int):
        """The training collator: a member's own for one objective, else each row by its member."""
        collators = [m.collator(tokenizer, mask_rate=mask_rate, seed=seed) for m in self.members]
        if not self.mixed:
            return collators[0]
        return MixedCollator(collators, self.weights, [m.causal for m in self.members], seed=seed)

    def targets_per_row(self, seq_len: int, mask_rate: float) -> float:
        """Labelled positions of a full row, on average over the mix (for FLOP estimates)."""
        return sum(w * m.targets_per_row(seq_len, mask_rate) for m, w in zip(self.members, self.weights))

    def metric_names(self, prefix: str) -> list[str]:
        if not self.mixed:
            return self.members[0].metric_names(prefix)
        return [f"{prefix}/loss"] + [n for m in self.members for n in m.metric_names(f"{prefix}/{m.name}")]

    def train_metric_names(self) -> list[str]:
        return self.members[0].train_metric_names() if not self.mixed else self.metric_names("train")

    def metrics(self, prefix: str, loss_sums: Sequence[float], correct: Sequence[float],
                targets: Sequence[float]) -> dict[str, float]:
        """One objective: its figures (``{prefix}/loss``, ...). A mix: ``{prefix}/loss``, the weighted
        sum of the members' mean losses (what the step minimises: a member without targets adds
        nothing), and each member's figures under ``{prefix}/<objective>/``."""
        if not self.mixed:
            return self.members[0].metrics(prefix, loss_sums[0] / max(targets[0], 1.0), correct[0],
                                           targets[0])
        out = {f"{prefix}/loss": sum(w * s / max(t, 1.0) for w, s, t in zip(self.weights, loss_sums, targets))}
        for member, s, c, t in zip(self.members, loss_sums, correct, targets):
            if t > 0:
                out.update(member.metrics(f"{prefix}/{member.name}", s / t, c, t))
        return out


def resolve_mix(phase_mix: Optional[dict], phase_objective: Optional[str], run_mix: Optional[dict],
                run_objective: str, export_as: Optional[str] = None) -> ObjectiveMix:
    """What a phase trains: its own mix or objective, else the run's mix or objective (a config's
    fields, for training and for the report of a finished run alike). ``export_as`` applies to a
    single objective too: one of the other side is refused (MixError), never ignored."""
    weights = phase_mix or ({phase_objective: 1.0} if phase_objective else None) \
        or run_mix or {run_objective: 1.0}
    return ObjectiveMix.of(dict(weights), export_as)


# How a model trained with a bound objective (MDLM) generates by default: recorded in its export's
# config.json as ``ettin_generation`` (ettin.model.hub), read by ``python -m ettin.generate``
# (ettin.evaluation.generation): one step per token, low-confidence remasking (LLaDA), one block.
UNMASKING_DEFAULTS = {"length": 32, "steps": 32, "block_length": None, "remasking": "low_confidence",
                      "temperature": 0.0}

OBJECTIVES: dict[str, Objective] = {}
# The objective a pair trains on the side its recipe does not name (ettin.train.run.pair_configs).
DEFAULT_FOR_SIDE = {"encoder": "mlm", "decoder": "clm"}


def register(objective: Objective) -> Objective:
    if objective.name in OBJECTIVES:
        raise ValueError(f"objective {objective.name!r} is registered already")
    OBJECTIVES[objective.name] = objective
    return objective


def default_objective(side: str) -> str:
    return DEFAULT_FOR_SIDE[side]


register(Objective("mlm", attention=Attention.BIDIRECTIONAL, masked=True, predicts_next_token=False,
                   collator_class=MLMCollator,
                   description="masked language modelling: predict masked tokens in place"))
register(Objective("clm", attention=Attention.CAUSAL, masked=False, predicts_next_token=True,
                   collator_class=CLMCollator,
                   description="causal language modelling: predict the next token"))
register(Objective("mntp", attention=Attention.BIDIRECTIONAL, masked=True, predicts_next_token=True,
                   collator_class=MNTPCollator,
                   description="masked next-token prediction (LLM2Vec): a masked token is predicted "
                               "from the position before it"))
register(Objective("prefix_lm", attention=Attention.PREFIX, masked=False, predicts_next_token=True,
                   collator_class=PrefixLMCollator,
                   description="prefix language modelling (T5, UL2's S-denoiser): bidirectional over a "
                               "prefix drawn per row, predict each next token after it"))
register(Objective("mdlm", attention=Attention.BIDIRECTIONAL, masked=True, predicts_next_token=False,
                   collator_class=MDLMCollator, bound=True,
                   description="masked diffusion (MDLM): a mask rate t per row from (eps, 1], every "
                               "masked token predicted in place, weighted 1/t (the bound)"))
