"""The encoder scorer (ettin-mlm) at a real vocabulary: memory bounded by the batch, not by the number
of requests; generate_until batched.

Also a benchmark (docs/benchmarks.md), the same child process run by hand:

    PYTHONPATH=$PWD python tests/test_eval_scoring.py --requests 30 300 [--scorer OLD_masked_lm.py]
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
CONTEXT, CONTINUATION, BATCH = 24, 4, 16


def _scorer_class(path: str | None):
    if path is None:
        from ettin.evaluation.masked_lm import MaskedLMHarness

        return MaskedLMHarness
    spec = importlib.util.spec_from_file_location("scorer_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MaskedLMHarness


def measure(request_counts: list[int], scorer_path: str | None = None) -> list[dict]:
    """Score ``n`` loglikelihood requests (a 24-token context, a 4-token continuation) for each n in turn
    with a tiny ModernBertForMaskedLM of Ettin's vocabulary; the peak RSS after each (it never goes down,
    so a later, larger n only raises it if its scoring needs more memory)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, global_attn_every_n_layers=2, local_attention=8,
                              reference_compile=False, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                              bos_token_id=1, eos_token_id=2)
    model = ModernBertForMaskedLM(config).eval()
    tokenizer = SimpleNamespace(**SPECIALS)
    lm = _scorer_class(scorer_path)(model, tokenizer=tokenizer, batch_size=BATCH, device="cpu")
    generator = torch.Generator().manual_seed(0)
    out = []
    for n in request_counts:
        tokens = torch.randint(10, 1000, (n, CONTEXT + CONTINUATION), generator=generator).tolist()
        requests = [(("", ""), row[:CONTEXT], row[CONTEXT:]) for row in tokens]
        started = time.perf_counter()
        scores = lm._loglikelihood_tokens(requests)
        seconds = time.perf_counter() - started
        assert len(scores) == n
        out.append({"requests": n, "seconds": round(seconds, 3), "requests_per_s": round(n / seconds, 1),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
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
    parser.add_argument("--scorer", help="a masked_lm.py to measure instead of ettin's (e.g. an older version)")
    arguments = parser.parse_args()
    print(json.dumps(measure(arguments.requests, arguments.scorer)))
