"""The smoke models learn: with the smoke recipe's own budget, LR and batch, every smoke size's encoder
and decoder ends with a validation loss clearly below the unigram entropy of the corpus it trained on
(the loss of a model that ignores context: an MLM encoder sits on that plateau for its first few
hundred thousand tokens). The entropy is computed here from the prepared tokens, read with the
`streaming` library and the prepared tokenizer, not with ettin's own code."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import pytest
from streaming import LocalDataset
from transformers import AutoTokenizer

from ettin.train.config import compose
from ettin.train.run import pair_configs, train

# How far below the unigram entropy (nats) a model must end: clearly off the plateau, which the
# validation loss's noise (32 samples) never reaches by chance.
MARGIN_NATS = 0.3


def unigram_entropy(prepared: Path) -> float:
    """Entropy (nats) of the non-special tokens of a prepared folder's train split."""
    special = set(AutoTokenizer.from_pretrained(prepared / "tokenizer").all_special_ids)
    counts = Counter()
    for sample in LocalDataset(local=str(prepared / "train")):
        counts.update(int(t) for t in sample["input_ids"] if int(t) not in special)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def last_validation_loss(run_dir: Path, phase: str) -> float:
    with (run_dir / "logs" / phase / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return float(rows[-1]["val/loss"])


@pytest.mark.slow
# The default pair (tiny) in every run of the suite; micro, the smoke ladder's second rung, only with
# `-m heavy` (another 3 minutes of CI's 2 cores for the same recipe at a larger width).
@pytest.mark.parametrize("size", ["tiny", pytest.param("micro", marks=pytest.mark.heavy)])
def test_every_smoke_model_ends_below_the_unigram_entropy(tmp_path, size):
    cfg = compose("smoke", [f"size={size}", f"output_dir={tmp_path / 'runs'}",
                            f"data_dir={tmp_path / 'data'}", "export_at_end=false", "eval_at_end=false"])
    runs = pair_configs(cfg)
    for run in runs:
        train(run)
    first, last = cfg.phase_order[0], cfg.phase_order[-1]
    entropy = unigram_entropy(tmp_path / "data" / f"builtin-{cfg.phases[first].seq_len}")
    assert 6.0 < entropy < 7.0  # the built-in corpus under the built-in tokenizer: 6.41 nats
    for run in runs:
        loss = last_validation_loss(run.run_dir, last)
        assert loss < entropy - MARGIN_NATS, (
            f"{run.run_name} ({size}) ends at validation loss {loss:.3f}, not clearly below the "
            f"unigram entropy {entropy:.3f}: it has not left the plateau")
