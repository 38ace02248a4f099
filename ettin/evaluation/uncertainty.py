"""How uncertain a score is, and whether two models' scores differ: standard errors, 95% intervals and
paired tests over the per-example results that evaluate() keeps beside eval.json.

A task's per-example results are one ``.npz`` file: ``index`` (the example's position in the task's
evaluation split, lm-eval's ``doc_id``), ``statistic`` (how the score is made from the columns) and
the columns themselves:

* ``mean`` (``value``): accuracy (1/0 per example), nDCG@10 per query; the score is their mean;
* ``word_perplexity`` (``loglikelihood``, ``weight``): lm-eval's ``weighted_perplexity``,
  ``exp(-sum loglikelihood / sum words)``;
* ``matthews_correlation``, ``spearman`` (``predicted``, ``gold``): computed over the whole set.

Standard error of a ``mean``: lm-eval's ``mean_stderr``, the sample standard deviation (n-1 in the
denominator) over sqrt(n); for 1/0 accuracy that is ``sqrt(p(1-p)/(n-1))``, a factor ``sqrt(n/(n-1))``
above the textbook ``sqrt(p(1-p)/n)``. Its 95% interval is the normal one, score +- 1.96 x stderr.
Every other statistic: a bootstrap over examples (``BOOTSTRAP_RESAMPLES`` resamples drawn with
``BOOTSTRAP_SEED``), the standard deviation of the resampled scores and their 2.5/97.5 percentiles.

Two models on the same examples: accuracy by McNemar's exact test (two-sided binomial test on the
examples where exactly one model is right), every other statistic by a paired bootstrap (the same
resampled examples for both; p = twice the smaller share of resampled differences on either side of 0).
The 95% interval of the difference is the paired bootstrap's in both cases. A difference is decided
at ``LEVEL``; otherwise it is "within noise".
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.05
Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile

MEAN, WORD_PERPLEXITY, MATTHEWS, SPEARMAN = "mean", "word_perplexity", "matthews_correlation", "spearman"
CHRF = "chrf"  # corpus chrF over (reference, prediction) pairs, lm-eval's own aggregation
MEAN_STDERR = "lm-eval mean_stderr formula: sample standard deviation (n-1) / sqrt(n) over {unit}; normal 95% interval"
BOOTSTRAP = (f"bootstrap over {{unit}}: {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}; standard deviation "
             "of the resampled scores, 2.5/97.5 percentile interval")
MCNEMAR = "McNemar exact (two-sided)"
PAIRED_BOOTSTRAP = f"paired bootstrap ({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED})"
UNPAIRED = "unpaired z-test from the two standard errors (no shared per-example results)"


# ---------------------------------------------------------------------------------------------------
# Per-example results


def save_examples(path: Path, index, statistic: str, **columns) -> None:
    """Write one task's per-example results (``index`` and ``columns`` aligned) to ``path`` (.npz), whole
    or not at all."""
    from ettin.store.fs import publishing

    with publishing(path) as temp:
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, index=np.asarray(index, dtype=np.int64), statistic=np.asarray(statistic),
                                **{name: np.asarray(values) for name, values in columns.items()})


def load_examples(path: Path | str) -> dict:
    """{"index", "statistic", columns...} of a per-example file."""
    with np.load(path) as data:
        examples = {name: data[name] for name in data.files}
    examples["statistic"] = str(examples["statistic"])
    return examples


def statistic(examples: dict, rows=None) -> float:
    """The score the per-example results make (over ``rows``, default all; an index array)."""
    take = (lambda column: examples[column]) if rows is None else (lambda column: examples[column][rows])
    kind = examples["statistic"]
    if kind == MEAN:
        return float(np.mean(take("value")))
    if kind == WORD_PERPLEXITY:
        return float(math.exp(-take("loglikelihood").sum() / take("weight").sum()))
    if kind == MATTHEWS:
        from sklearn.metrics import matthews_corrcoef

        return float(matthews_corrcoef(take("gold"), take("predicted")))
    if kind == SPEARMAN:
        from scipy.stats import spearmanr

        return float(spearmanr(take("gold"), take("predicted")).statistic)
    if kind == CHRF:
        from lm_eval.api.metrics import chrf

        return float(chrf(list(zip(take("reference").tolist(), take("prediction").tolist()))))
    raise ValueError(f"unknown per-example statistic {kind!r}")


def _resamples(n: int) -> np.ndarray:
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def _resampled(examples: dict, rows: np.ndarray) -> np.ndarray:
    """The statistic on every resample (``rows``: resamples x n), vectorised where it is a sum."""
    kind = examples["statistic"]
    if kind == MEAN:
        return examples["value"][rows].mean(axis=1)
    if kind == WORD_PERPLEXITY:
        return np.exp(-examples["loglikelihood"][rows].sum(axis=1) / examples["weight"][rows].sum(axis=1))
    return np.array([statistic(examples, r) for r in rows])


def mean_stderr(values) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation (ddof 1) / sqrt(n)."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def uncertainty(examples: dict, score: float, *, unit: str = "examples") -> dict:
    """{"stderr", "ci95", "stderr_method"} of ``score`` from its per-example results (lm-eval's own
    errors are off: its bootstrap's process pool can hang under torch's threads)."""
    if examples["statistic"] == MEAN:
        stderr, method = mean_stderr(examples["value"]), MEAN_STDERR.format(unit=unit)
        return {"stderr": stderr, "ci95": [score - Z95 * stderr, score + Z95 * stderr], "stderr_method": method}
    scores = _resampled(examples, _resamples(len(examples["index"])))
    low, high = np.nanpercentile(scores, [2.5, 97.5])
    return {"stderr": float(np.nanstd(scores, ddof=1)), "ci95": [float(low), float(high)],
            "stderr_method": BOOTSTRAP.format(unit=unit)}


# ---------------------------------------------------------------------------------------------------
# Two models


def _is_binary(examples: dict) -> bool:
    return examples["statistic"] == MEAN and bool(np.isin(examples["value"], (0.0, 1.0)).all())


def mcnemar_exact(right_a, right_b) -> float:
    """Two-sided exact McNemar p-value of two models' 1/0 results on the same examples."""
    right_a, right_b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1)) / 2 ** discordant
    return min(1.0, 2 * tail)


def paired_comparison(a: dict, b: dict) -> dict:
    """{"difference" (a - b), "difference_ci95", "p_value", "test"} of two models' per-example results
    on the same examples (same index order)."""
    if a["statistic"] != b["statistic"] or not np.array_equal(a["index"], b["index"]):
        raise ValueError("the two per-example results are not on the same examples")
    rows = _resamples(len(a["index"]))
    differences = _resampled(a, rows) - _resampled(b, rows)
    low, high = np.nanpercentile(differences, [2.5, 97.5])
    if _is_binary(a) and _is_binary(b):
        p_value, test = mcnemar_exact(a["value"], b["value"]), MCNEMAR
    else:
        valid = differences[~np.isnan(differences)]
        p_value = min(1.0, 2 * min(float((valid <= 0).mean()), float((valid >= 0).mean())))
        test = PAIRED_BOOTSTRAP
    return {"difference": statistic(a) - statistic(b), "difference_ci95": [float(low), float(high)],
            "p_value": p_value, "test": test}


def unpaired_comparison(score_a: float, stderr_a: float, score_b: float, stderr_b: float) -> dict:
    """The same record from the two scores and standard errors alone (a normal z-test)."""
    spread = math.hypot(stderr_a, stderr_b)
    difference = score_a - score_b
    if spread == 0:
        p_value = 1.0 if difference == 0 else 0.0
    else:
        p_value = math.erfc(abs(difference) / spread / math.sqrt(2))
    return {"difference": difference, "difference_ci95": [difference - Z95 * spread, difference + Z95 * spread],
            "p_value": p_value, "test": UNPAIRED}
