"""The objectives. Choosing one selects the attention direction, the collator (the labels) and the
metrics; the loss is the same cross-entropy over labelled positions for all of them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    causal: bool  # attention direction of the model
    masked: bool  # the collator masks tokens at a rate (MLM, MNTP); CLM predicts every next token
    # The output at position i predicts token i+1 (CLM; MNTP reads a masked token one position to
    # the left) rather than token i (MLM): recorded in exports so users read the outputs right.
    predicts_next_token: bool
    description: str

    def collator(self, tokenizer, *, mask_rate: float, seed: int, unpadded: bool = True):
        """This objective's collator; rows are unpadded (no compute spent on padding) by default."""
        from ettin.data.collate import CLMCollator, MLMCollator, MNTPCollator
        from ettin.data.tokenizer import special_ids

        ids = special_ids(tokenizer)
        if not self.masked:
            return CLMCollator(ids, unpadded=unpadded, vocab_size=len(tokenizer))
        collator = MNTPCollator if self.name == "mntp" else MLMCollator
        return collator(ids, vocab_size=len(tokenizer), mask_rate=mask_rate, seed=seed,
                        unpadded=unpadded)

    def targets_per_row(self, seq_len: int, mask_rate: float) -> int:
        """Labelled positions of a full row (for FLOP estimates)."""
        return round(mask_rate * seq_len) if self.masked else seq_len

    def metric_names(self, prefix: str) -> list[str]:
        second = "masked_accuracy" if self.masked else "perplexity"
        return [f"{prefix}/loss", f"{prefix}/{second}"]

    def metrics(self, prefix: str, loss: float, correct: float, targets: float) -> dict[str, float]:
        """``{prefix}/loss`` (mean over target tokens) and the objective's second figure: masked
        accuracy for masked objectives, perplexity for CLM."""
        out = {f"{prefix}/loss": loss}
        if self.masked:
            out[f"{prefix}/masked_accuracy"] = correct / max(targets, 1.0)
        else:
            out[f"{prefix}/perplexity"] = math.exp(min(loss, 30.0))
        return out


OBJECTIVES = {
    "mlm": Objective("mlm", causal=False, masked=True, predicts_next_token=False,
                     description="masked language modelling: predict masked tokens in place"),
    "clm": Objective("clm", causal=True, masked=False, predicts_next_token=True,
                     description="causal language modelling: predict the next token"),
    "mntp": Objective("mntp", causal=False, masked=True, predicts_next_token=True,
                      description="masked next-token prediction (LLM2Vec): a masked token is "
                                  "predicted from the position before it"),
}
