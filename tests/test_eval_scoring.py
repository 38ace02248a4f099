"""The encoder scorer (ettin-mlm) at a real vocabulary and realistic context lengths: memory bounded by
the batch, not by the number of requests (rows built one batch at a time); every batch scored;
generate_until batched.

Also a benchmark (docs/benchmarks.md), the same child process run by hand, one process per count:

    PYTHONPATH=$PWD python tests/test_eval_scoring.py --requests 3000 [--context 400] [--scorer OLD_masked_lm.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

VOCAB = 50_368  # Ettin's vocabulary
SPECIALS = dict(pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3)
CONTEXT, CONTINUATION, BATCH = 400, 4, 16  # ~400-token contexts, as lm-eval's few-shot prompts are


def _scorer_class(path: str | None):
    if path is None:
        from ettin.evaluation.masked_lm import MaskedLMHarness

        return MaskedLMHarness
    spec = importlib.util.spec_from_file_location("scorer_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MaskedLMHarness


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(request_counts: list[int], scorer_path: str | None = None, context: int = CONTEXT) -> list[dict]:
    """Score ``n`` loglikelihood requests (a ``context``-token context, a 4-token continuation) for each n
    in turn with a tiny ModernBertForMaskedLM of Ettin's vocabulary: the peak RSS once the requests exist
    (what lm-eval holds anyway) and after scoring them (a peak never goes down, so a later, larger n only
    raises it if its scoring needs more memory); their difference is what scoring added."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              max_position_embeddings=1024,
                              num_attention_heads=2, global_attn_every_n_layers=2, local_attention=8,
                              reference_compile=False, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2)
    model = ModernBertForMaskedLM(config).eval()
    tokenizer = SimpleNamespace(**SPECIALS)
    lm = _scorer_class(scorer_path)(model, tokenizer=tokenizer, batch_size=BATCH, device="cpu")
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in request_counts:
        tokens = torch.randint(10, 1000, (n, context + CONTINUATION), generator=generator).tolist()
        requests = [(("", ""), row[:context], row[context:]) for row in tokens]
        before = _peak_rss_mb()
        started = time.perf_counter()
        scores = lm._loglikelihood_tokens(requests)
        seconds = time.perf_counter() - started
        assert len(scores) == n
        out.append({"requests": n, "context": context, "seconds": round(seconds, 3),
                    "requests_per_s": round(n / seconds, 1), "peak_rss_before_scoring_mb": round(before, 1),
                    "peak_rss_mb": round(_peak_rss_mb(), 1)})
    return out


def test_scoring_memory_does_not_grow_with_the_number_of_requests():
    """30 then 300 requests at a 50,368-token vocabulary in a fresh process: the peak RSS grows by less
    than 25 MB (keeping a vocabulary-sized vector per scored token: 1,200 x 50,368 x 4 B = 242 MB)."""
    result = subprocess.run([sys.executable, __file__, "--requests", "30", "300"], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    small, large = json.loads(result.stdout.strip().splitlines()[-1])
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 25, (small, large)


class CountingStub:
    """A masked LM laid out as ModernBertForMaskedLM that always predicts token 7 and counts the
    backbone's forward passes and their batch sizes."""

    def __init__(self):
        import torch

        self.config = SimpleNamespace(max_position_embeddings=64)
        self.head = self.decoder = torch.nn.Identity()
        self.batches: list[int] = []

    def to(self, device):
        return self

    def eval(self):
        return self

    def model(self, input_ids, attention_mask):
        import torch

        self.batches.append(int(input_ids.shape[0]))
        hidden = torch.zeros((*input_ids.shape, 12))
        hidden[..., 7] = 1.0
        return SimpleNamespace(last_hidden_state=hidden)


def tiny_masked_lm(vocab: int = 64):
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, global_attn_every_n_layers=2, local_attention=8,
                              reference_compile=False, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2)
    return ModernBertForMaskedLM(config).eval()


def reference_log_prob(model, row: list[int], position: int, target: int) -> float:
    """One row through the model alone (no batching, no padding): the target's log-probability."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([row])).logits[0, position]
    return float(torch.log_softmax(logits, -1)[target])


def test_every_batch_is_scored_as_one_request_at_a_time_would_be():
    """Seven loglikelihood requests and three rolling texts at batch size 2 (many batches, lengths that
    differ, so rows are reordered and padded): each score equals the sum computed row by row with the
    model alone."""
    import random

    from lm_eval.api.instance import Instance

    from ettin.evaluation.masked_lm import MaskedLMHarness

    model = tiny_masked_lm()
    cls, sep, mask = SPECIALS["cls_token_id"], SPECIALS["sep_token_id"], SPECIALS["mask_token_id"]
    lm = MaskedLMHarness(model, tokenizer=SimpleNamespace(**SPECIALS), batch_size=2, device="cpu", pll_window=6)
    rng = random.Random(0)
    requests = [(("", ""), [rng.randrange(10, 64) for _ in range(rng.randint(3, 12))],
                 [rng.randrange(10, 64) for _ in range(rng.randint(1, 3))]) for _ in range(7)]
    for (_, context, continuation), (score, _) in zip(requests, lm._loglikelihood_tokens(requests)):
        expected = sum(reference_log_prob(model, [cls, *context, *continuation[:i], *[mask] * 3, sep],
                                          1 + len(context) + i, continuation[i]) for i in range(len(continuation)))
        assert abs(score - expected) < 1e-4
    texts = {f"text{k}": [rng.randrange(10, 64) for _ in range(length)] for k, length in enumerate((3, 9, 5))}
    lm.tok_encode = lambda text, **kwargs: texts[text]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0) for text in texts])
    for tokens, score in zip(texts.values(), rolling):
        expected = 0.0
        for start in range(0, len(tokens), 4):  # windows of pll_window - 2 tokens
            window = tokens[start:start + 4]
            expected += sum(reference_log_prob(model, [cls, *window[:j], mask, *window[j + 1:], sep], 1 + j,
                                               window[j]) for j in range(len(window)))
        assert abs(score - expected) < 1e-4


def test_rows_are_built_one_batch_at_a_time():
    """Whatever the number of requests, the scorer never holds more than one batch of built rows: each
    forward pass comes before the next batch's rows are built (counted by wrapping the row builders)."""
    from lm_eval.api.instance import Instance

    from ettin.evaluation.masked_lm import MaskedLMHarness

    lm = MaskedLMHarness(CountingStub(), tokenizer=SimpleNamespace(**SPECIALS), batch_size=4, device="cpu",
                         pll_window=8)
    built, scored, held = [0], [0], []

    def counting(build):
        def wrapped(*args):
            built[0] += 1
            return build(*args)
        return wrapped

    def forward(rows, logits_at=lm._logits_at):
        held.append(built[0] - scored[0])
        scored[0] += len(rows)
        return logits_at(rows)

    lm._pseudo_causal_row, lm._masked_row, lm._logits_at = (counting(lm._pseudo_causal_row),
                                                             counting(lm._masked_row), forward)
    lm._loglikelihood_tokens([(("", ""), [5] * (5 + n % 7), [6, 7, 8]) for n in range(30)])  # a 12-token vocabulary
    lm.tok_encode = lambda text, **kwargs: [5] * 20
    lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0) for _ in range(10)])
    assert scored[0] == built[0] == 30 * 3 + 10 * 20
    assert max(held) <= 4, held


def test_generate_until_runs_the_requests_of_a_batch_together():
    from lm_eval.api.instance import Instance

    from ettin.evaluation.masked_lm import MaskedLMHarness

    stub = CountingStub()
    tokenizer = SimpleNamespace(**SPECIALS, sep_token="[SEP]", decode=lambda ids, skip_special_tokens: "x" * len(ids))
    lm = MaskedLMHarness(stub, tokenizer=tokenizer, batch_size=4, device="cpu")
    lm.tok_encode = lambda text, **kwargs: [10, 11]
    requests = [Instance("generate_until", {}, ("ctx", {"until": ["\n"], "max_gen_toks": budget}), 0)
                for budget in (3, 3, 3, 1, 2)]
    assert lm.generate_until(requests) == ["xxx", "xxx", "xxx", "x", "xx"]
    # batch of 4: 3 steps (4, 3, 3 rows: the 1-token request leaves after step 1); then the last alone, 2 steps
    assert stub.batches == [4, 3, 3, 1, 1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="peak RSS and requests/s of the encoder scorer at Ettin's vocabulary")
    parser.add_argument("--requests", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--context", type=int, default=CONTEXT, help="context tokens per request")
    parser.add_argument("--scorer", help="a masked_lm.py to measure instead of ettin's (e.g. an older version)")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.requests, arguments.scorer, arguments.context)))
