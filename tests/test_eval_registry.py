"""The task registry, --list-tasks, the ettin-paper suite, bad input, and the paper's scores beside ours."""

from __future__ import annotations

import json

import pytest

from ettin.evaluation.models import EvalError
from ettin.evaluation.cli import main
from ettin.evaluation.models import EvalModel, resolve_model
from ettin.evaluation.offline import lm_eval_datasets
from ettin.evaluation.models import ettin_size
from ettin.evaluation.paper import comparison_rows, paper_scores
from ettin.evaluation.registry import PAPER_GENERATIVE, PAPER_RETRIEVAL_TASKS, SUITES, TASKS, resolve_tasks

# The paper's decoder table, column by column (ARC = arc_challenge, WSC = wsc273: docs/evaluation.md)
PAPER_DECODER_TASKS = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "lambada_openai": "acc",
                       "openbookqa": "acc_norm", "piqa": "acc_norm", "sciq": "acc_norm", "social_iqa": "acc",
                       "triviaqa": "exact_match", "winogrande": "acc", "wsc273": "acc"}
GLUE = ["cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "stsb"]


def test_ettin_paper_is_exactly_the_papers_tasks_zero_shot_with_their_metrics():
    tasks = resolve_tasks("ettin-paper")
    generative = {t.name: t.metric for t in tasks if t.library == "lm-eval"}
    assert generative == PAPER_DECODER_TASKS
    assert all(t.few_shot == 0 and not t.smoke for t in tasks)
    glue = [t for t in tasks if t.library == "transformers"]
    assert [t.name for t in glue] == GLUE
    assert [(t.metric, t.num_labels) for t in glue if t.name in ("cola", "mnli", "stsb")] == [
        ("matthews_correlation", 2), ("accuracy", 3), ("spearman", 1)]
    for task in glue:  # full training sets, the bert24 centre (batch 64, 512 tokens, wd 5e-6, 6% warmup)
        assert task.datasets[0].id == "nyu-mll/glue" and task.datasets[0].config == task.name
        settings = task.grid.settings()
        assert {(s["batch_size"], s["max_length"], s["weight_decay"], s["warmup_ratio"]) for s in settings} == {
            (64, 512, 5e-6, 0.06)}
        assert {"learning_rate": 5e-5, "epochs": 1.0} in [{k: s[k] for k in ("learning_rate", "epochs")}
                                                          for s in settings]
    # the MS MARCO fine-tune, then nDCG@10 on MS MARCO dev, MLDR's English test set and CodeSearchNet's test set
    assert [(t.name, t.metric, t.split, t.mteb_task, t.mteb_subsets) for t in tasks if t.category == "retrieval"] == [
        ("msmarco", "ndcg@10", "dev", "MSMARCO", ()), ("mldr", "ndcg@10", "test", "MultiLongDocRetrieval", ("en",)),
        ("codesearchnet", "ndcg@10", "test", "CodeSearchNetRetrieval",
         ("python", "javascript", "go", "ruby", "java", "php"))]
    assert [(t.name, t.library, t.mteb_benchmark) for t in tasks if t.category == "embedding"] == [
        ("mteb_v2_eng", "mteb", "MTEB(eng, v2)")]
    assert resolve_tasks("offline") == [TASKS[t] for t in SUITES["offline"]]
    assert all(t.smoke for t in resolve_tasks("offline"))


def test_registered_datasets_are_the_ones_lm_eval_loads():
    """--prefetch and the offline check use the registry's ids: they must match lm-eval's task yamls."""
    for task in PAPER_GENERATIVE:
        assert lm_eval_datasets(task.name) == task.datasets, task.name
    import mteb

    for task in PAPER_RETRIEVAL_TASKS:  # mteb's own dataset, revision, main score and subsets
        metadata = mteb.get_task(task.mteb_task).metadata
        assert {(d.id, d.revision) for d in task.datasets if d.id.startswith("mteb/")} == {
            (metadata.dataset["path"], metadata.dataset["revision"])}
        assert metadata.main_score == "ndcg_at_10" and task.split in metadata.eval_splits
        assert set(task.mteb_subsets) <= set(metadata.hf_subsets_to_langscripts), task.name
    assert [str(d) for d in TASKS["mldr"].datasets] == [
        "mteb/MultiLongDocRetrieval (en-corpus)", "mteb/MultiLongDocRetrieval (en-queries)",
        "mteb/MultiLongDocRetrieval (en-qrels)"]


def test_an_unknown_task_is_an_error_listing_close_names():
    with pytest.raises(EvalError, match=r"unknown task 'hellaswog'; did you mean hellaswag, hellaswag_"):
        resolve_tasks("sciq,hellaswog")
    with pytest.raises(EvalError, match=r"did you mean ettin-paper"):
        resolve_tasks("ettin-papr")
    assert [t.name for t in resolve_tasks("mnli,arc_easy")] == ["mnli", "arc_easy"]  # registered, lm-eval
    assert resolve_tasks("arc_easy")[0].library == "lm-eval"


def test_list_tasks_prints_every_suite_and_task_with_how_it_is_scored(capsys):
    assert main(["--list-tasks"]) == 0
    out = capsys.readouterr().out
    for suite, tasks in SUITES.items():
        assert f"  {suite}" in out and ", ".join(tasks) in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and len(line.split()) > 5}
    assert lines["hellaswag"].split()[1:6] == ["generation", "lm-eval", "acc_norm", "higher", "better"]
    assert "Rowan/hellaswag" in lines["hellaswag"]
    assert "nyu-mll/glue (mnli)" in lines["mnli"] and "validation_matched" in lines["mnli"]
    assert lines["mldr"].split()[1:4] == ["retrieval", "sentence-transformers", "ndcg@10"]
    assert "mteb/MultiLongDocRetrieval (en-corpus, en-queries, en-qrels)" in lines["mldr"]
    assert "mteb/CodeSearchNetRetrieval (python-corpus, python-queries, python-qrels, javascript-corpus" in \
        lines["codesearchnet"]
    assert "none (generated offline)" in lines["smoke_lm"] and "lower better" in lines["smoke_lm"]
    assert set(TASKS) <= set(lines)


def test_a_model_that_is_not_modernbert_is_refused_naming_its_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(EvalError, match="model_type 'llama' is not ModernBERT"):
        resolve_model(tmp_path)


def test_paper_scores_cite_the_paper_and_cover_every_size():
    scores = paper_scores()
    for source in scores["sources"].values():
        assert source["arxiv"] == "2507.11412" and source["version"] and source["table"]
    sizes = ["17m", "32m", "68m", "150m", "400m", "1b"]
    assert {f"{k}-{s}" for k in ("encoder", "decoder") for s in sizes} == set(scores["models"])
    for name, entry in scores["models"].items():
        assert entry["hub_id"] == f"jhu-clsp/ettin-{name}"
        if name.startswith("decoder"):
            assert set(PAPER_DECODER_TASKS) <= set(entry["scores"])
    assert scores["models"]["decoder-1b"]["scores"]["triviaqa"] == 29.3  # recipe.md §9.2
    assert scores["models"]["encoder-150m"]["scores"]["mnli"] == 89.2  # recipe.md §9.1


def test_released_ids_and_ettin_shapes_are_compared_with_the_paper():
    assert ettin_size("jhu-clsp/ettin-decoder-150m", {}) == "150m"
    assert ettin_size("jhu-clsp/ettin-encoder-1b@step599525", {}) == "1b"
    shape = dict(num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12)
    assert ettin_size("runs/my-150m", shape) == "150m"
    assert ettin_size("runs/other", {**shape, "hidden_size": 640}) is None
    report = {"models": {
        "jhu-clsp/ettin-decoder-150m": {"kind": "decoder", "ettin_size": "150m", "tasks": {
            "hellaswag": {"score": 0.41, "smoke": False}, "mnli": {"score": 0.8, "smoke": False}}},
        "tiny": {"kind": "decoder", "ettin_size": None, "tasks": {"hellaswag": {"score": 0.3, "smoke": False}}}}}
    (row,) = comparison_rows(report)
    assert row[:4] == ("jhu-clsp/ettin-decoder-150m", "hellaswag", 41.0, 40.3)
    assert "arXiv 2507.11412" in row[4]
    # the generative average once all ten tasks are scored (the paper's "Avg" column)
    report["models"]["jhu-clsp/ettin-decoder-150m"]["tasks"] = {
        task: {"score": 0.01 * i} for i, task in enumerate(PAPER_DECODER_TASKS)}
    rows = {task: (ours, paper) for _, task, ours, paper, _ in comparison_rows(report)}
    assert len(rows) == 11 and rows["average"] == (pytest.approx(4.5), 46.2)
    # an encoder's MTEB(eng, v2) mean and its clustering and retrieval means (the encoder table's columns)
    report["models"]["jhu-clsp/ettin-decoder-150m"].update(kind="encoder", tasks={"mteb_v2_eng": {
        "score": 0.5, "mean_by_type": {"Clustering": 0.4, "Retrieval": 0.45, "STS": 0.7}}})
    rows = {task: (ours, paper) for _, task, ours, paper, _ in comparison_rows(report)}
    assert rows == {"mteb_v2_eng": (50.0, 54.0), "mteb_v2_eng_clustering": (40.0, 41.5),
                    "mteb_v2_eng_retrieval": (45.0, 45.7)}
    # MLDR and CodeSearchNet are tasks of ours, beside the encoder table's columns of the same name
    report["models"]["jhu-clsp/ettin-decoder-150m"]["tasks"] = {"mldr": {"score": 0.3}, "codesearchnet": {"score": 0.7}}
    rows = {task: (ours, paper) for _, task, ours, paper, _ in comparison_rows(report)}
    assert rows == {"mldr": (30.0, 31.8), "codesearchnet": (70.0, 76.3)}


def test_a_sweep_reports_its_best_setting_and_records_every_setting(monkeypatch, tmp_path):
    import ettin.evaluation as evaluation

    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    monkeypatch.setattr(evaluation, "_glue_rows", lambda task, limit: (rows, rows))
    by_rate = {1e-5: 0.5, 3e-5: 0.9, 5e-5: 0.7, 8e-5: 0.6}
    monkeypatch.setattr(evaluation, "finetune_classification", lambda model, train, evaluation, settings, **kw: [
        {**s, "score": by_rate[s["learning_rate"]] - s["epochs"] / 100} for s in settings])
    model = EvalModel("m", tmp_path, "encoder", None, 0)
    result = evaluation._classification(TASKS["mnli"], model, None, None, 0, tmp_path, None)
    assert [(s["learning_rate"], s["epochs"]) for s in result["sweep"]] == [
        (lr, epochs) for lr in (1e-5, 3e-5, 5e-5, 8e-5) for epochs in (1.0, 2.0)]
    assert (result["chosen"], result["score"]) == (2, pytest.approx(0.89))  # lr 3e-5, 1 epoch


def test_a_hub_revision_is_fetched_and_named(monkeypatch, tmp_path):
    from ettin.evaluation.models import split_revision

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "modernbert-decoder", **dict(
        num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12)}))
    fetched = []
    monkeypatch.setattr("ettin.model.hub.resolve_folder", lambda name, revision=None: fetched.append((name, revision))
                        or tmp_path)
    monkeypatch.setattr("ettin.evaluation.models._parameters", lambda folder: 7)
    model = resolve_model("jhu-clsp/ettin-decoder-150m@step599525")
    assert fetched == [("jhu-clsp/ettin-decoder-150m", "step599525")]
    assert (model.name, model.kind, model.ettin_size) == ("jhu-clsp/ettin-decoder-150m@step599525", "decoder", "150m")
    assert split_revision(tmp_path) == (str(tmp_path), None)  # a local path is never split
