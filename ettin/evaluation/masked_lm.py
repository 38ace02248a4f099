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

from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

DEFAULT_EXTRA_MASKS = 2
DEFAULT_PLL_WINDOW = 512


@register_model("ettin-mlm")
class MaskedLMHarness(TemplateLM):
    """``pretrained``: a folder or hub id that ``AutoModelForMaskedLM`` loads (or a loaded model,
    with ``tokenizer``)."""

    backend = "causal"  # context and continuation are encoded together, then split

    def __init__(self, pretrained, tokenizer=None, batch_size: int | str = 32, device: Optional[str] = None,
                 extra_masks: int | str = DEFAULT_EXTRA_MASKS, max_length: Optional[int | str] = None,
                 pll_window: int | str = DEFAULT_PLL_WINDOW, dtype: str = "float32",
                 max_batch_size: Optional[int] = None) -> None:  # lm-eval passes it; one fixed batch size here
        super().__init__()
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        if isinstance(pretrained, str):
            tokenizer = AutoTokenizer.from_pretrained(pretrained)
            pretrained = AutoModelForMaskedLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        if tokenizer is None or tokenizer.mask_token_id is None:
            raise ValueError("ettin-mlm needs the model's tokenizer, with a [MASK] token")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = pretrained.to(self._device).eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> 32
        self.extra_masks = int(extra_masks)
        self.shift = int(bool(getattr(self.model.config, "ettin_predicts_next_token", False)))
        self._max_length = int(max_length or min(self.model.config.max_position_embeddings, 8192))
        self.pll_window = min(int(pll_window), self._max_length)
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

    # -----------------------------------------------------------------------------------------------
    # One primitive: log-probabilities at chosen positions of many rows, batched.

    def _log_probs(self, rows: list[tuple[list[int], int]]) -> list[torch.Tensor]:
        """For each (input ids, position): log-softmax of the logits that predict that position."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[Optional[torch.Tensor]] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = len(rows[chunk[0]][0])
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for b, i in enumerate(chunk):
                ids[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
                attention[b, :len(rows[i][0])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self._device),
                                    attention_mask=attention.to(self._device)).logits
            read = torch.tensor([rows[i][1] - self.shift for i in chunk], device=logits.device)
            picked = logits[torch.arange(len(chunk), device=logits.device), read].float()
            for b, i in enumerate(chunk):
                out[i] = torch.log_softmax(picked[b], dim=-1).cpu()
        return out  # type: ignore[return-value]

    def _pseudo_causal_row(self, past: list[int]) -> tuple[list[int], int]:
        """``[CLS] past [MASK]... [SEP]`` (past left-truncated to fit) and the first [MASK]'s position."""
        keep = self._max_length - 3 - self.extra_masks
        past = past[-keep:] if keep > 0 else []
        return [self.cls, *past, *[self.mask] * (1 + self.extra_masks), self.sep], 1 + len(past)

    # -----------------------------------------------------------------------------------------------
    # lm-eval's three request types

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows, owners, targets = [], [], []
        for n, (_, context, continuation) in enumerate(requests):
            context = context[1:] if context[:1] == [self.cls] else context  # the empty-context prefix
            for i, token in enumerate(continuation):
                rows.append(self._pseudo_causal_row(context + continuation[:i]))
                owners.append(n)
                targets.append(token)
        totals, greedy = [0.0] * len(requests), [True] * len(requests)
        for n, token, log_probs in zip(owners, targets, self._log_probs(rows)):
            totals[n] += float(log_probs[token])
            greedy[n] &= int(log_probs.argmax()) == token
        results = list(zip(totals, greedy))
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self.pll_window - 2  # room for [CLS] and [SEP]
        rows, owners, targets = [], [], []
        for n, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for start in range(0, len(tokens), window):
                chunk = tokens[start:start + window]
                for j, token in enumerate(chunk):
                    rows.append(([self.cls, *chunk[:j], self.mask, *chunk[j + 1:], self.sep], 1 + j))
                    owners.append(n)
                    targets.append(token)
        totals = [0.0] * len(requests)
        for n, token, log_probs in zip(owners, targets, self._log_probs(rows)):
            totals[n] += float(log_probs[token])
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or [self.tokenizer.sep_token]
            until = [until] if isinstance(until, str) else until
            past, generated, text = self.tok_encode(context), [], ""
            for _ in range(int(settings.get("max_gen_toks", 256))):
                token = int(self._log_probs([self._pseudo_causal_row(past + generated)])[0].argmax())
                if token == self.sep:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results
