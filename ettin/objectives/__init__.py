"""The objectives, one registry entry each. Choosing one selects the attention direction, the
collator (the labels), the metrics and what an export of the model is; the loss is the same
cross-entropy over labelled positions for all of them.

A new objective is one ``register(Objective(...))`` with its collator class (ettin.objectives.collate
holds the collators). May import: ettin.data (tokenizer ids); nothing of training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ettin.objectives.collate import CLMCollator, MaskRate, MLMCollator, MNTPCollator

SIDES = {"encoder": "ModernBertForMaskedLM", "decoder": "ModernBertDecoderForCausalLM"}


@dataclass(frozen=True)
class Objective:
    name: str
    causal: bool  # attention direction of the model
    masked: bool  # the collator masks tokens at a rate (MLM, MNTP); CLM predicts every next token
    # The output at position i predicts token i+1 (CLM; MNTP reads a masked token one position to
    # the left) rather than token i (MLM): recorded in exports so users read the outputs right.
    predicts_next_token: bool
    collator_class: Callable
    description: str

    @property
    def side(self) -> str:
        """``decoder`` for causal attention, ``encoder`` for bidirectional: what a pair pairs."""
        return "decoder" if self.causal else "encoder"

    @property
    def export_class(self) -> str:
        """The transformers class an export of a model trained with this objective loads as."""
        return SIDES[self.side]

    def collator(self, tokenizer, *, mask_rate: float | MaskRate, seed: int, unpadded: bool = True):
        """This objective's collator; rows are unpadded (no compute spent on padding) by default.
        ``mask_rate``: a fixed rate, or a phase's schedule (``MaskRate``)."""
        from ettin.data.tokenizer import special_ids

        ids = special_ids(tokenizer)
        if not self.masked:
            return self.collator_class(ids, unpadded=unpadded, vocab_size=len(tokenizer))
        return self.collator_class(ids, vocab_size=len(tokenizer), mask_rate=mask_rate, seed=seed,
                                   unpadded=unpadded)

    def targets_per_row(self, seq_len: int, mask_rate: float) -> int:
        """Labelled positions of a full row (for FLOP estimates)."""
        return round(mask_rate * seq_len) if self.masked else seq_len

    def metric_names(self, prefix: str) -> list[str]:
        second = "masked_accuracy" if self.masked else "perplexity"
        return [f"{prefix}/loss", f"{prefix}/{second}"]

    def train_metric_names(self) -> list[str]:
        """Training's figures: the metrics, and for masked objectives the realised mask rate."""
        return self.metric_names("train") + (["train/mask_rate"] if self.masked else [])

    def metrics(self, prefix: str, loss: float, correct: float, targets: float) -> dict[str, float]:
        """``{prefix}/loss`` (mean over target tokens) and the objective's second figure: masked
        accuracy for masked objectives, perplexity for CLM."""
        out = {f"{prefix}/loss": loss}
        if self.masked:
            out[f"{prefix}/masked_accuracy"] = correct / max(targets, 1.0)
        else:
            out[f"{prefix}/perplexity"] = math.exp(min(loss, 30.0))
        return out


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


register(Objective("mlm", causal=False, masked=True, predicts_next_token=False,
                   collator_class=MLMCollator,
                   description="masked language modelling: predict masked tokens in place"))
register(Objective("clm", causal=True, masked=False, predicts_next_token=True,
                   collator_class=CLMCollator,
                   description="causal language modelling: predict the next token"))
register(Objective("mntp", causal=False, masked=True, predicts_next_token=True,
                   collator_class=MNTPCollator,
                   description="masked next-token prediction (LLM2Vec): a masked token is predicted "
                               "from the position before it"))
