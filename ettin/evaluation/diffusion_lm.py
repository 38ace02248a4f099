"""A masked diffusion model (trained with ``objective=mdlm``) as an lm-eval model, scored through its
bound rather than read as a pseudo-causal LM (ettin.evaluation.masked_lm).

* ``loglikelihood(context, continuation)``: minus the MDLM bound on -log p(continuation | context),
  estimated by Monte Carlo as LLaDA does (Nie et al. 2025, Eq. 6 / Algorithm 3): each of
  ``samples`` draws takes l uniform in {1..L} (L the continuation's tokens), masks l of its tokens
  chosen uniformly, and scores ``(L / l) x sum of log p(token | [CLS] context masked-continuation
  [SEP])`` over the masked ones; the mean over draws is the estimate (a lower bound on the
  log-likelihood in expectation). The draws are seeded by (seed, request order), so a rerun gives
  the same scores; ``stderrs`` keeps each request's standard error over its draws.
* ``loglikelihood_rolling``: the same bound for a whole text, window by window (context empty).
* ``generate_until``: iterative unmasking (ettin.evaluation.generation), ``max_gen_toks`` tokens at
  one step per token, low-confidence remasking, then cut at a stop string.

Registered with lm-eval as ``ettin-mdlm`` when ``ettin.evaluation`` is imported.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from lm_eval.api.registry import register_model

from ettin.evaluation.masked_lm import MaskedLMHarness

DEFAULT_BOUND_SAMPLES = 16


@register_model("ettin-mdlm")
class DiffusionLMHarness(MaskedLMHarness):
    def __init__(self, pretrained, *, samples: int | str = DEFAULT_BOUND_SAMPLES, seed: int | str = 0,
                 **kwargs) -> None:
        super().__init__(pretrained, **kwargs)
        self.samples, self.seed = int(samples), int(seed)
        self.stderrs: list[float] = []  # per scored request, in order: the estimate's standard error

    def _masked_log_probs(self, rows: list[tuple[list[int], list[int], list[int]]]) -> list[float]:
        """For each (ids, positions, targets): the summed log-probability of the targets at the
        positions, the backbone on the padded batch and the head only at those positions."""
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, attention = self._padded([row for row, _, _ in chunk])
            batch = torch.tensor([b for b, (_, positions, _) in enumerate(chunk) for _ in positions])
            positions = torch.tensor([p for _, ps, _ in chunk for p in ps])
            targets = torch.tensor([t for _, _, ts in chunk for t in ts], device=self._device)
            with torch.inference_mode():
                hidden = self.model.model(input_ids=ids, attention_mask=attention).last_hidden_state
                logits = self.model.decoder(self.model.head(hidden[batch.to(self._device),
                                                                   positions.to(self._device)])).float()
                scores = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, batch, scores.double().cpu())
            out.extend(sums.tolist())
        return out

    def bound(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float]]:
        """(estimate, standard error) of log p(continuation | context) through the bound, per
        (context, continuation) pair (``samples`` draws each; see the module docstring)."""
        rows, owners, weights = [], [], []
        for n, (context, continuation) in enumerate(pairs):
            keep = self._max_length - 2 - len(continuation)
            context = context[-keep:] if keep > 0 else []
            rng = np.random.default_rng([self.seed, n])
            length = len(continuation)
            for _ in range(self.samples):
                masked = np.sort(rng.choice(length, size=rng.integers(1, length + 1), replace=False))
                ids = [self.cls, *context, *continuation, self.sep]
                for i in masked:
                    ids[1 + len(context) + i] = self.mask
                rows.append((ids, [1 + len(context) + int(i) for i in masked],
                             [continuation[int(i)] for i in masked]))
                owners.append(n)
                weights.append(length / len(masked))
        draws: list[list[float]] = [[] for _ in pairs]
        for n, weight, value in zip(owners, weights, self._masked_log_probs(rows)):
            draws[n].append(weight * value)
        return [(float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0)
                for d in draws]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context[1:] if context[:1] == [self.cls] else context, continuation)
                 for _, context, continuation in requests]
        estimates = self.bound(pairs)
        self.stderrs.extend(stderr for _, stderr in estimates)
        # "Greedy" is a pseudo-causal reading; the bound has none: reported False.
        results = [(estimate, False) for estimate, _ in estimates]
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self._max_length - 2
        pairs, owners = [], []
        for n, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for start in range(0, len(tokens), window):
                pairs.append(([], tokens[start:start + window]))
                owners.append(n)
        totals, variances = [0.0] * len(requests), [0.0] * len(requests)
        for n, (estimate, stderr) in zip(owners, self.bound(pairs)):
            totals[n] += estimate
            variances[n] += stderr ** 2
        self.stderrs.extend(math.sqrt(v) for v in variances)
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ettin.evaluation.generation import GenerationSettings, Unmasker

        unmasker = Unmasker(self.model, self.tokenizer, {})
        results = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or [self.tokenizer.sep_token]
            until = [until] if isinstance(until, str) else list(until)
            length = int(settings.get("max_gen_toks", 32))
            text = unmasker.generate(context, GenerationSettings(length=length, steps=length,
                                                                 seed=self.seed))
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results

    def mean_stderr(self) -> Optional[float]:
        """The mean standard error of the requests scored so far (None before any)."""
        return float(np.mean(self.stderrs)) if self.stderrs else None
