"""A prefix LM (trained with ``objective=prefix_lm``) as an lm-eval model, read the way it was trained:
the text it is given is its prefix, attended bidirectionally, and what it predicts is attended causally
after it. No transformers class attends this way, so ettin's own model runs it (loaded from the Hugging
Face folder ``python -m ettin.eval`` exports for it, ettin.evaluation.models), with each row's
``prefix_lengths``.

* ``loglikelihood(context, continuation)``: ``[CLS] context continuation`` with ``[CLS] context`` as
  the prefix; continuation token i is read at the position before it (the model predicts the next
  token). Greedy: every continuation token is the argmax there. A row longer than ``max_length`` loses
  its oldest tokens after [CLS].
* ``loglikelihood_rolling``: windows of ``max_length`` tokens with ``[CLS]`` alone as the prefix (plain
  causal reading, so the perplexity is a decoder's); each window after the first is cut afresh, without
  the previous one as context (the bound of a document is the sum over its windows).
* ``generate_until``: greedy; the prompt is the prefix, the generated tokens are read causally after it.
  One forward pass per generated token (no key/value cache: a prefix row changes no past position as it
  grows, but ettin's model keeps no cache).

Registered with lm-eval as ``ettin-prefix`` when ``ettin.evaluation`` is imported.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from lm_eval.api.registry import register_model

from ettin.evaluation.masked_lm import TokenHarness


@register_model("ettin-prefix")
class PrefixLMHarness(TokenHarness):
    """``pretrained``: a Hugging Face folder exported from a prefix-LM checkpoint (either class: ettin's
    model is built from it and run causal, widened by each row's prefix), or a loaded ettin
    ``ModernBert`` with ``tokenizer``."""

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = 32, device: Optional[str] = None,
                 max_length: Optional[int | str] = None, dtype: str = "float32",
                 max_batch_size: Optional[int] = None) -> None:  # lm-eval passes it; one fixed batch size here
        if isinstance(pretrained, str):
            from transformers import AutoTokenizer

            from ettin.model.hub import load_hf

            tokenizer = AutoTokenizer.from_pretrained(pretrained)
            # sdpa: every backend but flash runs a prefix (ettin.model.modernbert).
            pretrained = load_hf(pretrained, causal=True, attn_implementation="sdpa").to(getattr(torch, dtype))
        if tokenizer is None:
            raise ValueError("ettin-prefix needs the model's tokenizer")
        super().__init__(pretrained, tokenizer, batch_size=batch_size, device=device, max_length=max_length)

    # -----------------------------------------------------------------------------------------------
    # One primitive: the logits of a batch of rows, each with its prefix

    def _logits(self, rows: list[tuple[list[int], int]]) -> Iterator[tuple[int, torch.Tensor]]:
        """For each (ids, prefix length), ``batch_size`` rows at a time: (its index, its [len(ids), vocab]
        logits, on the device), each position's predicting the next token."""
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, attention = self._padded([row for row, _ in chunk])
            prefix = torch.tensor([length for _, length in chunk], dtype=torch.long, device=self._device)
            with torch.inference_mode():
                logits = self.model(ids, attention, prefix_lengths=prefix).logits
            yield from ((start + b, logits[b, :len(row)]) for b, (row, _) in enumerate(chunk))

    def _scored(self, rows: list[tuple[list[int], int, int]]) -> list[tuple[float, bool]]:
        """For each (ids, prefix length, n): the summed log-probability of the row's last n tokens, each
        read at the position before it, and whether each is the argmax there."""
        scores = []
        for r, logits in self._logits([(ids, prefix) for ids, prefix, _ in rows]):
            ids, _, n = rows[r]
            read = logits[len(ids) - n - 1:len(ids) - 1].float()
            targets = torch.tensor(ids[len(ids) - n:], device=read.device)
            log_probs = torch.log_softmax(read, dim=-1).gather(1, targets[:, None])
            scores.append((float(log_probs.sum()), bool((read.argmax(-1) == targets).all())))
        return scores

    # -----------------------------------------------------------------------------------------------
    # lm-eval's three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        budget = self._max_length - 1  # tokens after [CLS]
        for _, context, continuation in requests:
            context = context[1:] if context[:1] == [self.cls] else context  # lm-eval's empty context
            # Cut from the left, as lm-eval's hf model cuts: the context first, then (a continuation
            # longer than the row) the continuation's first tokens, which are then not scored.
            tokens = [*context, *continuation][-budget:]
            scored = min(len(continuation), budget)
            rows.append(([self.cls, *tokens], 1 + len(tokens) - scored, scored))
        results = self._scored(rows)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self._max_length - 1  # room for [CLS]
        rows, owners = [], []
        for n, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for start in range(0, len(tokens), window):
                piece = tokens[start:start + window]
                rows.append(([self.cls, *piece], 1, len(piece)))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (log_prob, _) in zip(owners, self._scored(rows)):
            totals[n] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _next_tokens(self, prompts: list[list[int]], generated: list[list[int]]) -> list[int]:
        """The prompt as the prefix (after [CLS]); its oldest tokens are dropped when the row would not fit."""
        rows = []
        for prompt, tokens in zip(prompts, generated):
            past = [*prompt, *tokens]
            dropped = max(len(past) + 1 - self._max_length, 0)
            rows.append(([self.cls, *past[dropped:]], 1 + max(len(prompt) - dropped, 0)))
        return [int(logits[-1].argmax()) for _, logits in self._logits(rows)]
