"""An encoder (masked LM) as an lm-eval model, so encoders and decoders run the same tasks.

Samuel (2024), "BERTs are Generative In-Context Learners": a masked LM reads only the past and a few
[MASK] placeholders for the future, i.e. a pseudo-causal LM:

* ``loglikelihood``: continuation token i is scored from ``[CLS] context continuation[:i]
  [MASK] x (1 + extra_masks) [SEP]``, the first [MASK] standing for token i; the sum over i is the
  continuation's log-likelihood (greedy: every token is the argmax at its [MASK]).
* ``generate_until``: the same input; the first [MASK] is filled with its argmax, appended, repeated.
* ``loglikelihood_rolling`` is the pseudo-log-likelihood (Salazar et al., 2020): each token masked
  alone with the whole window around it visible (disjoint windows of ``pll_window`` tokens, 512 by
  default: a window costs one forward pass per token); exp(-PLL / words) is the pseudo-perplexity.

An MNTP encoder (config ``ettin_predicts_next_token: true``) predicts the token at j from position
j - 1: its logits are read one position to the left.

Registered with lm-eval as ``ettin-mlm`` when ``ettin.evaluation`` is imported:
``lm_eval.simple_evaluate(model="ettin-mlm", model_args="pretrained=PATH", tasks=[...])``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

DEFAULT_EXTRA_MASKS = 2
DEFAULT_PLL_WINDOW = 512


class TokenHarness(TemplateLM):
    """What ettin's lm-eval models share: [CLS] and [SEP] as lm-eval's prefix and end-of-text tokens,
    one fixed batch size, the device, and greedy ``generate_until`` over ``_next_tokens``."""

    backend = "causal"  # context and continuation are encoded together, then split

    def __init__(self, model, tokenizer, *, batch_size: int | str, device: Optional[str],
                 max_length: Optional[int | str]) -> None:
        super().__init__()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> 32
        self._max_length = int(max_length or min(self.model.config.max_position_embeddings, 8192))
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.mask, self.pad = tokenizer.mask_token_id, tokenizer.pad_token_id

    @property
    def eot_token_id(self) -> int:
        return self.sep

    @property
    def prefix_token_id(self) -> int:
        return self.cls

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows right-padded into one batch: (input ids, attention mask), on the device."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for b, row in enumerate(rows):
            ids[b, :len(row)] = torch.tensor(row)
            attention[b, :len(row)] = 1
        return ids.to(self._device), attention.to(self._device)

    def _next_tokens(self, prompts: list[list[int]], generated: list[list[int]]) -> list[int]:
        """The greedy next token of each (prompt, tokens generated so far), in one batch."""
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy, ``batch_size`` requests at a time: one forward pass per generated token of the batch;
        a request leaves the batch at [SEP], at a stop string or at ``max_gen_toks``."""
        results: list[str] = [""] * len(requests)
        for start in range(0, len(requests), self.batch_size):
            batch = list(range(start, min(start + self.batch_size, len(requests))))
            prompts = {n: self.tok_encode(requests[n].args[0]) for n in batch}
            stops, budgets, generated = {}, {}, {n: [] for n in batch}
            for n in batch:
                settings = requests[n].args[1]
                until = settings.get("until") or [self.tokenizer.sep_token]
                stops[n] = [until] if isinstance(until, str) else list(until)
                budgets[n] = int(settings.get("max_gen_toks", 256))
            active = [n for n in batch if budgets[n] > 0]
            while active:
                next_tokens = self._next_tokens([prompts[n] for n in active], [generated[n] for n in active])
                still = []
                for n, token in zip(active, next_tokens):
                    if token == self.sep:
                        continue
                    generated[n].append(token)
                    text = self.tokenizer.decode(generated[n], skip_special_tokens=True)
                    if len(generated[n]) < budgets[n] and not any(stop in text for stop in stops[n]):
                        still.append(n)
                active = still
            for n in batch:
                text = self.tokenizer.decode(generated[n], skip_special_tokens=True)
                for stop in stops[n]:
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
                results[n] = text
        return results


@register_model("ettin-mlm")
class MaskedLMHarness(TokenHarness):
    """``pretrained``: a folder or hub id that ``AutoModelForMaskedLM`` loads (or a loaded model,
    with ``tokenizer``), laid out as ``ModernBertForMaskedLM``: a backbone ``model`` and a vocabulary
    head ``decoder(head(hidden))``, which runs only at the positions read (memory bounded by the batch,
    not by the number of requests)."""

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = 32, device: Optional[str] = None,
                 extra_masks: int | str = DEFAULT_EXTRA_MASKS, max_length: Optional[int | str] = None,
                 pll_window: int | str = DEFAULT_PLL_WINDOW, dtype: str = "float32",
                 max_batch_size: Optional[int] = None) -> None:  # lm-eval passes it; one fixed batch size here
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        if isinstance(pretrained, str):
            tokenizer = AutoTokenizer.from_pretrained(pretrained)
            pretrained = AutoModelForMaskedLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        if tokenizer is None or tokenizer.mask_token_id is None:
            raise ValueError("ettin-mlm needs the model's tokenizer, with a [MASK] token")
        super().__init__(pretrained, tokenizer, batch_size=batch_size, device=device, max_length=max_length)
        self.extra_masks = int(extra_masks)
        self.shift = int(bool(getattr(self.model.config, "ettin_predicts_next_token", False)))
        self.pll_window = min(int(pll_window), self._max_length)

    # -----------------------------------------------------------------------------------------------
    # One primitive: the output head run only at the positions read, one batch at a time.

    def _logits_at(self, rows: list[tuple[list[int], int]]) -> torch.Tensor:
        """[len(rows), vocab] float logits that predict each row's position (one batch of rows): the
        backbone runs on the padded batch, the vocabulary head only at the positions read."""
        ids, attention = self._padded([row for row, _ in rows])
        read = torch.tensor([position - self.shift for _, position in rows], device=self._device)
        with torch.inference_mode():
            hidden = self.model.model(input_ids=ids, attention_mask=attention).last_hidden_state
            picked = hidden[torch.arange(len(rows), device=self._device), read]
            return self.model.decoder(self.model.head(picked)).float()

    def _target_log_probs(self, count: int, length: Callable[[int], int],
                          build: Callable[[int], tuple[list[int], int, int]]) -> Iterator[tuple[int, float, bool]]:
        """For rows 0..count-1 (``build(i)``: input ids, position, target token; ``length(i)``: its
        length, known without building it): (i, the target's log-probability at that position, whether
        it is the argmax). Rows are batched longest first across all of them, and built one batch at a
        time: memory is bounded by the batch, not by the number of rows times their length."""
        order = sorted(range(count), key=lambda i: -length(i))
        for start in range(0, count, self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows = [build(i) for i in chunk]
            logits = self._logits_at([row[:2] for row in rows])
            targets = torch.tensor([row[2] for row in rows], device=logits.device)
            log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            greedy = logits.argmax(-1) == targets
            yield from zip(chunk, log_probs.tolist(), greedy.tolist())

    def _past_budget(self) -> int:
        """How many past tokens a pseudo-causal row holds at most."""
        return max(self._max_length - 3 - self.extra_masks, 0)

    def _pseudo_causal_row(self, past: list[int]) -> tuple[list[int], int]:
        """``[CLS] past [MASK]... [SEP]`` (past left-truncated to fit) and the first [MASK]'s position."""
        keep = self._past_budget()
        past = past[-keep:] if keep else []
        return [self.cls, *past, *[self.mask] * (1 + self.extra_masks), self.sep], 1 + len(past)

    def _masked_row(self, window: list[int], j: int) -> tuple[list[int], int, int]:
        """``[CLS] window [SEP]`` with token j masked, the mask's position and the token."""
        return [self.cls, *window[:j], self.mask, *window[j + 1:], self.sep], 1 + j, window[j]

    # -----------------------------------------------------------------------------------------------
    # lm-eval's three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        def prefixed(n: int) -> bool:  # lm-eval's prefix token stands for an empty context
            return requests[n][1][:1] == [self.cls]

        def context(n: int) -> list[int]:
            return requests[n][1][1:] if prefixed(n) else requests[n][1]

        rows = [(n, i) for n, (_, _, continuation) in enumerate(requests) for i in range(len(continuation))]
        budget = self._past_budget()

        def length(r: int) -> int:
            n, i = rows[r]
            return min(len(requests[n][1]) - prefixed(n) + i, budget) + 3 + self.extra_masks

        def build(r: int) -> tuple[list[int], int, int]:
            n, i = rows[r]
            continuation = requests[n][2]
            return (*self._pseudo_causal_row(context(n) + continuation[:i]), continuation[i])

        totals, greedy = [0.0] * len(requests), [True] * len(requests)
        for r, log_prob, is_greedy in self._target_log_probs(len(rows), length, build):
            n = rows[r][0]
            totals[n] += log_prob
            greedy[n] &= is_greedy
        results = list(zip(totals, greedy))
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self.pll_window - 2  # room for [CLS] and [SEP]
        texts = [self.tok_encode(request.args[0]) for request in requests]
        rows = [(n, start, j) for n, tokens in enumerate(texts) for start in range(0, len(tokens), window)
                for j in range(min(window, len(tokens) - start))]

        def length(r: int) -> int:
            n, start, _ = rows[r]
            return min(window, len(texts[n]) - start) + 2

        def build(r: int) -> tuple[list[int], int, int]:
            n, start, j = rows[r]
            return self._masked_row(texts[n][start:start + window], j)

        totals = [0.0] * len(requests)
        scored = self._target_log_probs(len(rows), length, build)
        for r, log_prob, _ in scored:
            totals[rows[r][0]] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _next_tokens(self, prompts: list[list[int]], generated: list[list[int]]) -> list[int]:
        rows = [self._pseudo_causal_row(prompt + tokens) for prompt, tokens in zip(prompts, generated)]
        return self._logits_at(rows).argmax(-1).tolist()
