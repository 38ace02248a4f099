"""The objectives. Choosing one selects the attention direction and the collator (the labels);
the loss is the same cross-entropy over labelled positions for all of them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    causal: bool  # attention direction of the model
    masked: bool  # the collator masks tokens at a rate (MLM, MNTP); CLM predicts every next token
    description: str


OBJECTIVES = {
    "mlm": Objective("mlm", causal=False, masked=True,
                     description="masked language modelling: predict masked tokens in place"),
    "clm": Objective("clm", causal=True, masked=False,
                     description="causal language modelling: predict the next token"),
    "mntp": Objective("mntp", causal=False, masked=True,
                      description="masked next-token prediction (LLM2Vec): a masked token is "
                                  "predicted from the position before it"),
}


def make_collator(objective: str, tokenizer, *, mask_rate: float, seed: int, unpadded: bool = True):
    """The collator of ``objective``; rows are unpadded (no compute spent on padding) by default."""
    from ettin.data.collate import CLMCollator, MLMCollator, MNTPCollator
    from ettin.data.tokenizer import special_ids

    ids = special_ids(tokenizer)
    if objective == "clm":
        return CLMCollator(ids, unpadded=unpadded)
    collator = MLMCollator if objective == "mlm" else MNTPCollator
    return collator(ids, vocab_size=len(tokenizer), mask_rate=mask_rate, seed=seed, unpadded=unpadded)
