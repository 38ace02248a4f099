"""Standard errors, intervals and paired tests (ettin.evaluation.uncertainty) and the pair table's winners
(ettin.report.scores), checked against independent references: lm-eval's own mean_stderr, the binomial
formula, scipy's exact binomial test and the delta method."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr
from scipy.stats import binomtest

from ettin.evaluation import uncertainty
from ettin.report import scores

N = 300


def binary(p: float, n: int = N, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def examples(statistic: str = uncertainty.MEAN, **columns) -> dict:
    n = len(next(iter(columns.values())))
    return {"index": np.arange(n), "statistic": statistic, **{k: np.asarray(v) for k, v in columns.items()}}


def test_an_accuracys_stderr_is_lm_evals_and_the_binomial_one_up_to_the_n_minus_1_convention():
    """lm-eval's mean_stderr divides the variance by n-1: sqrt(p(1-p)/(n-1)), which is sqrt(n/(n-1)) times
    the binomial sqrt(p(1-p)/n); for n = 300 within 0.17%."""
    values = binary(0.6)
    p = values.mean()
    record = uncertainty.uncertainty(examples(value=values), p)
    assert record["stderr"] == pytest.approx(lm_eval_mean_stderr(list(values)), rel=1e-12)
    binomial = math.sqrt(p * (1 - p) / N)
    assert record["stderr"] / binomial == pytest.approx(math.sqrt(N / (N - 1)), rel=1e-12)
    assert abs(record["stderr"] / binomial - 1) < 0.0017
    assert record["ci95"] == pytest.approx([p - 1.96 * record["stderr"], p + 1.96 * record["stderr"]], rel=1e-3)
    assert "n-1" in record["stderr_method"]


def test_the_bootstrap_of_a_perplexity_matches_the_delta_method():
    """With one word per passage, word perplexity is exp(-mean loglikelihood): its standard error is about
    perplexity x stderr(loglikelihood)."""
    loglikelihood = np.random.default_rng(2).normal(-5.0, 1.0, 400)
    data = examples(uncertainty.WORD_PERPLEXITY, loglikelihood=loglikelihood, weight=np.ones(400))
    perplexity = uncertainty.statistic(data)
    assert perplexity == pytest.approx(math.exp(-loglikelihood.mean()), rel=1e-9)
    record = uncertainty.uncertainty(data, perplexity)
    delta = perplexity * lm_eval_mean_stderr(list(loglikelihood))
    assert record["stderr"] == pytest.approx(delta, rel=0.1)  # 1000 resamples: a few % of Monte Carlo error
    low, high = record["ci95"]
    assert low < perplexity < high and "bootstrap" in record["stderr_method"] and "1000 resamples" in \
        record["stderr_method"]


def test_mcnemar_is_scipys_exact_binomial_test_on_the_discordant_examples():
    a, b = binary(0.6, seed=3), binary(0.5, seed=4)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert uncertainty.mcnemar_exact(a, b) == pytest.approx(
        binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
    assert uncertainty.mcnemar_exact(a, a) == 1.0


@pytest.mark.parametrize("statistic, columns", [
    (uncertainty.MEAN, lambda rng: {"value": (rng.random(N) < 0.6).astype(float)}),
    (uncertainty.MEAN, lambda rng: {"value": rng.random(N)}),  # nDCG@10 per query
    (uncertainty.WORD_PERPLEXITY, lambda rng: {"loglikelihood": rng.normal(-40, 5, N),
                                               "weight": rng.integers(5, 15, N).astype(float)}),
    (uncertainty.MATTHEWS, lambda rng: {"predicted": rng.integers(0, 2, N), "gold": rng.integers(0, 2, N)}),
])
def test_two_copies_of_one_model_are_within_noise(statistic, columns):
    data = examples(statistic, **columns(np.random.default_rng(5)))
    compared = uncertainty.paired_comparison(data, data)
    assert compared["difference"] == 0 and compared["p_value"] == 1.0
    assert scores.decided_winner(compared, "a", "b", True) == scores.WITHIN_NOISE


# ------------------------------------------------------------------------------------------------
# The pair table over eval.json files with per-example results


def write_evaluation(folder, per_model: dict[str, dict[str, tuple[str, dict]]]) -> None:
    """eval.json and its examples/ in ``folder``; ``per_model``: {model: {task: (category, examples)}}."""
    models = {}
    for name, tasks in per_model.items():
        models[name] = {"path": f"/x/{name}", "kind": "encoder" if "enc" in name else "decoder",
                        "objective": None, "parameters": 1, "tasks": {}}
        for task, (category, data) in tasks.items():
            relative = f"examples/{name}--{task}.npz"
            uncertainty.save_examples(folder / relative, **data)
            score = uncertainty.statistic(data)
            models[name]["tasks"][task] = {
                "category": category, "metric": "acc", "score": score, "higher_is_better": True, "smoke": True,
                "n_examples": len(data["index"]), "split": "test", "seed": 0, "limit": None,
                "per_example": relative, **uncertainty.uncertainty(data, score)}
    (folder / "eval.json").write_text(json.dumps({"format": "ettin-eval/1", "suite": "offline",
                                                  "created": "2026-01-01T00:00:00", "models": models}))


def test_the_same_models_examples_twice_are_within_noise_on_every_task(tmp_path):
    rng = np.random.default_rng(6)
    tasks = {"cloze": ("generation", examples(value=(rng.random(400) < 0.6).astype(float))),
             "nli": ("classification", examples(value=(rng.random(N) < 0.38).astype(float))),
             "retrieval": ("retrieval", examples(value=rng.random(150)))}
    write_evaluation(tmp_path, {"enc": tasks, "dec": tasks})
    table = scores.score_table(scores.load_evaluation(tmp_path / "eval.json"), "enc", "dec")
    assert set(table["winner"]) == {scores.WITHIN_NOISE} and set(table["agrees"]) == {"-"}
    assert table["test"].tolist() == [uncertainty.MCNEMAR, uncertainty.MCNEMAR, uncertainty.PAIRED_BOOTSTRAP]


def test_a_clear_difference_names_the_right_winner_and_a_small_one_none(tmp_path):
    """The decoder is right on 80 more cloze examples (decided); the encoder on 5 more NLI examples of 300
    (0.383 vs 0.367, the default pair's case: inside the noise)."""
    rng = np.random.default_rng(7)
    cloze_enc = (rng.random(400) < 0.5).astype(float)
    cloze_dec = cloze_enc.copy()
    cloze_dec[np.flatnonzero(cloze_enc == 0)[:80]] = 1.0
    nli_dec = np.zeros(N)
    nli_dec[:110] = 1.0
    nli_enc = nli_dec.copy()
    nli_enc[110:130] = 1.0
    nli_enc[:15] = 0.0
    write_evaluation(tmp_path, {"enc": {"cloze": ("generation", examples(value=cloze_enc)),
                                        "nli": ("classification", examples(value=nli_enc))},
                                "dec": {"cloze": ("generation", examples(value=cloze_dec)),
                                        "nli": ("classification", examples(value=nli_dec))}})
    table = scores.score_table(scores.load_evaluation(tmp_path / "eval.json"), "enc", "dec").set_index("task")
    assert table.loc["cloze", "winner"] == "dec" and table.loc["cloze", "agrees"] == "yes"
    assert table.loc["cloze", "p_value"] < 1e-6 and table.loc["cloze", "difference"] == pytest.approx(-0.2)
    low, high = table.loc["cloze", "difference_ci95"]
    assert low < -0.2 < high < 0
    assert table.loc["nli", "winner"] == scores.WITHIN_NOISE and table.loc["nli", "agrees"] == "-"
    assert table.loc["nli", "p_value"] == pytest.approx(binomtest(15, 35, 0.5).pvalue)


def test_results_on_other_examples_fall_back_to_the_unpaired_test(tmp_path):
    data = examples(value=binary(0.6))
    write_evaluation(tmp_path, {"enc": {"nli": ("classification", data)}, "dec": {"nli": ("classification", data)}})
    evaluation = scores.load_evaluation(tmp_path / "eval.json")
    evaluation["models"]["dec"]["tasks"]["nli"]["seed"] = 1  # another seed: other generated examples
    row = scores.score_table(evaluation, "enc", "dec").iloc[0]
    assert row["test"] == uncertainty.UNPAIRED and row["winner"] == scores.WITHIN_NOISE
    del evaluation["models"]["dec"]["tasks"]["nli"]["stderr"]
    assert scores.score_table(evaluation, "enc", "dec").iloc[0]["winner"] == "not tested (no standard error)"


def test_the_pair_figure_draws_each_scores_recorded_95_percent_interval(tmp_path):
    """A bootstrap interval is asymmetric: the bar spans exactly eval.json's ci95, not score +- 1.96 stderr."""
    from ettin.report import plots

    loglikelihood = np.random.default_rng(8).normal(-5.0, 1.0, 60)
    data = examples(uncertainty.WORD_PERPLEXITY, loglikelihood=loglikelihood, weight=np.ones(60))
    write_evaluation(tmp_path, {"enc": {"lm": ("language_modeling", data)}, "dec": {"lm": ("language_modeling", data)}})
    evaluation = scores.load_evaluation(tmp_path / "eval.json")
    table = scores.score_table(evaluation, "enc", "dec")
    (axis, *_) = plots.plot_scores(table, ["enc", "dec"]).axes
    (container,) = [c for c in axis.containers if hasattr(c, "lines")]  # the error bars (not the bars)
    (segments,) = container.lines[2]
    low, high = evaluation["models"]["enc"]["tasks"]["lm"]["ci95"]
    assert segments.get_segments()[0][:, 1].tolist() == pytest.approx([low, high])
    assert high - table["score_a"][0] != pytest.approx(table["score_a"][0] - low, rel=1e-3)


def test_a_generation_tasks_corpus_chrf_gets_a_bootstrap_error_and_a_paired_test(tmp_path):
    """smoke_continuation's chrF is a corpus statistic: from its (reference, prediction) pairs the score is
    sacrebleu's corpus chrF (lm-eval's aggregation), its error a bootstrap, and a copy of it is within noise."""
    import sacrebleu

    from ettin.evaluation import _harness_examples

    references = [f"the rest of sentence {i} ends here" for i in range(40)]
    predictions = [text if i % 3 else "something else" for i, text in enumerate(references)]
    samples = [{"doc_id": i, "chrf": [reference, prediction]}
               for i, (reference, prediction) in reversed(list(enumerate(zip(references, predictions))))]
    record = _harness_examples(samples, "chrf")
    assert record["statistic"] == uncertainty.CHRF and record["index"] == list(range(40))
    loaded = examples(uncertainty.CHRF, reference=record["reference"], prediction=record["prediction"])
    score = uncertainty.statistic(loaded)
    assert score == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, rel=1e-12)
    error = uncertainty.uncertainty(loaded, score)
    assert 0 < error["stderr"] < 20 and error["ci95"][0] < score < error["ci95"][1]
    assert error["stderr_method"].startswith("bootstrap over examples")
    uncertainty.save_examples(tmp_path / "continuation.npz", **{k: v for k, v in record.items()})
    assert uncertainty.statistic(uncertainty.load_examples(tmp_path / "continuation.npz")) == score
    same = uncertainty.paired_comparison(loaded, loaded)
    assert same["difference"] == 0 and same["difference_ci95"] == [0.0, 0.0]
