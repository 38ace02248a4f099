"""ettin.eval on an offline compute node: real lm-eval tasks and GLUE tasks read from a datasets cache.

The cache is what one online ``load_dataset(id, config)`` leaves in ``HF_DATASETS_CACHE``
(``<namespace>___<name>/<config>/0.0.0/<hash>/`` holding ``dataset_info.json`` and
``<name>-<split>.arrow``), written here by ``datasets``' own ArrowWriter and DatasetInfo, in each
dataset's real column schema and splits with a few rows. Nothing goes online (conftest sets
HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""

from __future__ import annotations

import io
import json
import shutil
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from datasets import ClassLabel, DatasetInfo, Features, Sequence, SplitDict, SplitInfo, Value
from datasets.arrow_writer import ArrowWriter
from test_eval import folders  # noqa: F401  the tiny encoder and decoder saved by transformers

from ettin.evaluation.models import EvalError
from ettin.evaluation import evaluate
from ettin.evaluation.registry import CODESEARCHNET_LANGUAGES
from ettin.evaluation.runners import msmarco_finetune

STRING = Value("string")
TRIVIAQA_FEATURES = Features({
    "question": STRING, "question_id": STRING, "question_source": STRING,
    "entity_pages": Sequence({"doc_source": STRING, "filename": STRING, "title": STRING, "wiki_context": STRING}),
    "search_results": Sequence({"description": STRING, "filename": STRING, "rank": Value("int32"), "title": STRING,
                                "url": STRING, "search_context": STRING}),
    "answer": {"aliases": Sequence(STRING), "normalized_aliases": Sequence(STRING), "matched_wiki_entity_name": STRING,
               "normalized_matched_wiki_entity_name": STRING, "normalized_value": STRING, "type": STRING,
               "value": STRING},
})
WORDS = "alpha beta gamma delta module function class return value import print list".split()


def _text(i: int, n: int = 8) -> str:
    return " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(n))


def _sciq(i: int) -> dict:
    return {"question": _text(i, 5) + "?", "distractor1": WORDS[i % 12], "distractor2": WORDS[(i + 1) % 12],
            "distractor3": WORDS[(i + 2) % 12], "correct_answer": WORDS[(i + 3) % 12], "support": _text(i + 1)}


def _triviaqa(i: int) -> dict:
    answer = WORDS[i % 12]
    return {"question": _text(i, 6), "question_id": f"tq{i}", "question_source": "http://www.example.org",
            "entity_pages": {"doc_source": [], "filename": [], "title": [], "wiki_context": []},
            "search_results": {"description": [], "filename": [], "rank": [], "title": [], "url": [],
                               "search_context": []},
            "answer": {"aliases": [answer], "normalized_aliases": [answer], "matched_wiki_entity_name": "",
                       "normalized_matched_wiki_entity_name": "", "normalized_value": answer, "type": "WikipediaEntity",
                       "value": answer}}


GLUE_PAIR = Features({"sentence1": STRING, "sentence2": STRING,
                      "label": ClassLabel(names=["entailment", "not_entailment"]), "idx": Value("int32")})
# (cache folder, config folder, arrow name, features, {split: row maker}, rows per split) per dataset
CACHED = {
    "sciq": ("allenai___sciq", "default", "sciq", Features({k: STRING for k in _sciq(0)}),
             ("train", "validation", "test"), _sciq),
    "lambada_openai": ("EleutherAI___lambada_openai", "default", "lambada_openai", Features({"text": STRING}),
                       ("test",), lambda i: {"text": _text(i, 10)}),
    "triviaqa": ("mandarjoshi___trivia_qa", "rc.nocontext", "trivia_qa", TRIVIAQA_FEATURES,
                 ("train", "validation", "test"), _triviaqa),
    "sst2": ("nyu-mll___glue", "sst2", "glue", Features({"sentence": STRING, "label": ClassLabel(
        names=["negative", "positive"]), "idx": Value("int32")}), ("train", "validation", "test"),
        lambda i: {"sentence": " ".join([WORDS[i % 2]] * (2 + i % 4)), "label": i % 2, "idx": i}),
    "rte": ("nyu-mll___glue", "rte", "glue", GLUE_PAIR, ("train", "validation", "test"),
            lambda i: {"sentence1": _text(i), "sentence2": _text(i + i % 2, 4), "label": i % 2, "idx": i}),
    "stsb": ("nyu-mll___glue", "stsb", "glue", Features({"sentence1": STRING, "sentence2": STRING,
                                                         "label": Value("float32"), "idx": Value("int32")}),
             ("train", "validation", "test"),
             lambda i: {"sentence1": _text(i), "sentence2": _text(i + i % 3, 6), "label": 5.0 * (i % 3) / 2, "idx": i}),
}


MSMARCO_TRIPLETS = "msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1"
CACHED.update({  # the paper's retrieval: sentence-transformers' hard triplets, then mteb's MSMARCO (BEIR layout)
    "msmarco-triplets": (f"sentence-transformers___{MSMARCO_TRIPLETS}", "triplet-hard", MSMARCO_TRIPLETS,
                         Features({"query": STRING, "positive": STRING, "negative": STRING}), ("train",),
                         lambda i: {"query": _text(i, 3), "positive": _text(i, 7), "negative": _text(i + 5, 7)}),
    "mteb-msmarco-corpus": ("mteb___msmarco", "corpus", "msmarco",
                            Features({"_id": STRING, "title": STRING, "text": STRING}), ("corpus",),
                            lambda i: {"_id": f"d{i}", "title": "", "text": _text(i, 7)}),
    "mteb-msmarco-queries": ("mteb___msmarco", "queries", "msmarco", Features({"_id": STRING, "text": STRING}),
                             ("queries",), lambda i: {"_id": f"q{i}", "text": _text(i, 3)}),
    "mteb-msmarco-qrels": ("mteb___msmarco", "default", "msmarco",
                           Features({"query-id": STRING, "corpus-id": STRING, "score": Value("int64")}),
                           ("train", "dev", "test"), lambda i: {"query-id": f"q{i}", "corpus-id": f"d{i}", "score": 1}),
})


def _mteb_retrieval_configs(name: str, subset: str, splits: tuple[str, ...], id_column: str) -> dict:
    """One hf subset of an mteb 2.x retrieval dataset: its SUBSET-corpus, -queries and -qrels configs, each
    with the task's splits, document i relevant to query i."""
    folder = f"mteb___{name}"
    return {
        f"{name}-{subset}-corpus": (folder, f"{subset}-corpus", name,
                                    Features({id_column: STRING, "title": STRING, "text": STRING}), splits,
                                    lambda i: {id_column: f"{subset}-d{i}", "title": "", "text": _text(i, 40)}),
        f"{name}-{subset}-queries": (folder, f"{subset}-queries", name, Features({id_column: STRING, "text": STRING}),
                                     splits, lambda i: {id_column: f"{subset}-q{i}", "text": _text(i, 3)}),
        f"{name}-{subset}-qrels": (folder, f"{subset}-qrels", name, Features(
            {"query-id": STRING, "corpus-id": STRING, "score": Value("int64")}), splits,
            lambda i: {"query-id": f"{subset}-q{i}", "corpus-id": f"{subset}-d{i}", "score": 1}),
    }


MLDR, CODESEARCHNET = "multi_long_doc_retrieval", "code_search_net_retrieval"  # mteb/MultiLongDocRetrieval, ...
for language in ("en", "de"):  # two of MLDR's 13 languages: the paper's English one is read, German is not
    CACHED.update(_mteb_retrieval_configs(MLDR, language, ("dev", "test", "train"), "id"))
for language in CODESEARCHNET_LANGUAGES:
    CACHED.update(_mteb_retrieval_configs(CODESEARCHNET, language, ("test",), "_id"))


def write_cached_dataset(cache: Path, task: str, rows: int = 16) -> Path:
    """The folder one online load_dataset of ``task``'s dataset leaves, written by datasets itself."""
    folder_name, config, name, features, splits, make = CACHED[task]
    folder = cache / folder_name / config / "0.0.0" / "4f6c3e1b2a0d9c8e7f6a5b4c3d2e1f0a9b8c7d6e"
    folder.mkdir(parents=True)
    split_dict = SplitDict(dataset_name=name)
    for split in splits:
        with ArrowWriter(features=features, path=str(folder / f"{name}-{split}.arrow")) as writer:
            for i in range(rows):
                writer.write(features.encode_example(make(i)))
            examples, size = writer.finalize()
        split_dict.add(SplitInfo(name=split, num_bytes=size, num_examples=examples, dataset_name=name))
    DatasetInfo(features=features, config_name=config, dataset_name=name, builder_name="parquet",
                splits=split_dict).write_to_directory(str(folder))
    return folder


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-datasets-cache"
    root.mkdir()
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root))
    return root


def test_the_cache_fixture_is_what_load_dataset_reads_offline(cache):
    write_cached_dataset(cache, "rte")
    data = datasets.load_dataset("nyu-mll/glue", "rte")
    assert {k: len(v) for k, v in data.items()} == {"train": 16, "validation": 16, "test": 16}
    assert data["train"].features["label"].names == ["entailment", "not_entailment"]


def test_lm_eval_tasks_of_three_output_types_run_offline_and_resume(folders, cache, tmp_path, capsys):  # noqa: F811
    for task in ("sciq", "lambada_openai", "triviaqa"):  # multiple choice, loglikelihood, generate_until
        write_cached_dataset(cache, task)
    console = io.StringIO()
    models = [folders["encoder"], folders["decoder"]]
    report = evaluate(models, tasks="sciq,lambada_openai,triviaqa", out=tmp_path / "eval", limit=4, console=console)
    for name, kind in (("tiny-encoder", "encoder"), ("tiny-decoder", "decoder")):
        tasks = report["models"][name]["tasks"]
        assert {t: (r["metric"], r["n_examples"], r["split"], r["few_shot"], r["smoke"]) for t, r in tasks.items()} == {
            "sciq": ("acc_norm", 4, "test", 0, False), "lambada_openai": ("acc", 4, "test", 0, False),
            "triviaqa": ("exact_match", 4, "validation", 0, False)}
        for result in tasks.values():
            assert (result["library"], result["library_version"]) == ("lm-eval", version("lm_eval"))
            assert 0.0 <= result["score"] <= 1.0
            assert result["model_args"]["model"] == ("hf" if kind == "decoder" else "ettin-mlm")
            assert result["model_args"].get("add_bos_token") is (True if kind == "decoder" else None)
    lines = console.getvalue().splitlines()  # one line per model and task; the libraries' output in eval.log
    assert len(lines) == 6 and all(" on 4 examples, " in line for line in lines), lines
    assert capsys.readouterr() == ("", "")  # nothing else reaches the terminal: it is in eval.log
    assert "lm_eval" in (tmp_path / "eval" / "eval.log").read_text()
    again = io.StringIO()
    assert evaluate(models, tasks="sciq,lambada_openai,triviaqa", out=tmp_path / "eval", limit=4,
                    console=again)["models"] == report["models"]
    assert again.getvalue().count("already in eval.json (same weights, tokenizer, settings and versions), not rerun") == 6


def test_glue_single_sentence_pair_and_regression_tasks_run_offline_with_their_sweep(folders, cache,  # noqa: F811
                                                                                       tmp_path):
    for task in ("sst2", "rte", "stsb"):
        write_cached_dataset(cache, task)
    report = evaluate([folders["encoder"]], tasks="sst2,rte,stsb", out=tmp_path, limit=4, learning_rates=(1e-3,),
                      console=io.StringIO())
    for task, metric in (("sst2", "accuracy"), ("rte", "accuracy"), ("stsb", "spearman")):
        result = report["models"]["tiny-encoder"]["tasks"][task]
        assert (result["metric"], result["split"], result["n_examples"], result["n_train_examples"]) == (
            metric, "validation", 4, 16)
        assert -1.0 <= result["score"] <= 1.0
        assert [(s["learning_rate"], s["epochs"], s["batch_size"], s["max_length"]) for s in result["sweep"]] == [
            (1e-3, 1.0, 64, 512), (1e-3, 2.0, 64, 512)]  # the bert24 grid's shape, the learning rate replaced
        scores = [s["score"] for s in result["sweep"]]
        assert result["chosen"] == scores.index(max(scores)) and result["score"] == max(scores)
    assert json.loads((tmp_path / "eval.json").read_text()) == report


def test_a_dataset_missing_from_the_offline_cache_is_one_error_naming_it_and_the_fix(folders, cache):  # noqa: F811
    write_cached_dataset(cache, "sciq")
    with pytest.raises(EvalError) as error:
        evaluate([folders["decoder"]], tasks="sciq,winogrande", limit=4)
    message = str(error.value)
    assert "'allenai/winogrande' (config 'winogrande_xl')" in message
    assert f"python -m ettin.eval --prefetch --tasks sciq,winogrande {folders['decoder']}" in message


def test_prefetch_loads_every_dataset_of_the_tasks_and_the_hub_models_and_refuses_offline(monkeypatch):
    from ettin.evaluation import offline
    from ettin.evaluation.registry import (PAPER_GENERATIVE, PAPER_GLUE, PAPER_RETRIEVAL, PAPER_RETRIEVAL_TASKS,
                                           Dataset, resolve_tasks)

    tasks = resolve_tasks("ettin-paper")
    with pytest.raises(EvalError, match="--prefetch downloads; unset HF_HUB_OFFLINE"):
        offline.prefetch(tasks, [])
    for variable in offline.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable)
    loaded, models = [], []
    monkeypatch.setattr(offline, "_load", lambda dataset: loaded.append(dataset) or {"test": [0, 0, 0]})
    monkeypatch.setattr("ettin.model.hub.resolve_folder",
                        lambda name, revision=None: models.append((name, revision)) or Path("/cache") / name)
    mteb_loaded = []

    class MtebTask:  # what prefetch reads of an mteb task
        metadata = SimpleNamespace(name="ArguAna", dataset={"path": "mteb/arguana", "revision": "c22ab2a"})

        def load_data(self):
            mteb_loaded.append(self.metadata.name)

    monkeypatch.setattr("ettin.evaluation.runners.mteb_benchmark_tasks",
                        lambda name: [MtebTask()] if name == "MTEB(eng, v2)" else [])
    lines = offline.prefetch(tasks, ["jhu-clsp/ettin-decoder-150m@step599525"])
    assert mteb_loaded == ["ArguAna"] and "mteb MTEB(eng, v2) ArguAna: mteb/arguana @ c22ab2a" in lines
    assert loaded == [*(t.datasets[0] for t in PAPER_GENERATIVE),
                      *(Dataset("nyu-mll/glue", t.name) for t in PAPER_GLUE),
                      *(d for t in PAPER_RETRIEVAL_TASKS for d in t.datasets)]
    assert [str(d) for d in PAPER_RETRIEVAL.datasets] == [
        "sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1 (triplet-hard)",
        "mteb/msmarco (corpus)", "mteb/msmarco (queries)", "mteb/msmarco (default)"]
    assert models == [("jhu-clsp/ettin-decoder-150m", "step599525")]
    assert lines[0] == "dataset allenai/ai2_arc (ARC-Challenge): test 3" and len(lines) == len(loaded) + 2


def test_the_papers_msmarco_retrieval_fine_tunes_then_scores_through_mteb_offline(folders, cache,  # noqa: F811
                                                                                 tmp_path):
    write_cached_dataset(cache, "msmarco-triplets", rows=40)
    for part in ("corpus", "queries", "qrels"):
        write_cached_dataset(cache, f"mteb-msmarco-{part}", rows=12)
    report = evaluate([folders["encoder"], folders["decoder"]], tasks="msmarco", out=tmp_path, limit=4,
                      console=io.StringIO())
    for name in ("tiny-encoder", "tiny-decoder"):
        result = report["models"][name]["tasks"]["msmarco"]
        assert (result["metric"], result["split"], result["n_examples"], result["n_train_examples"]) == (
            "ndcg@10", "dev", 12, 16)  # 12 dev queries; 4 x limit of the 36 triplets left after the held-out 4
        assert (result["mteb_task"], result["library"]) == ("MSMARCO", "sentence-transformers")
        assert result["score"] == result["mteb_scores"]["ndcg_at_10"] and 0.0 < result["score"] <= 1.0
        assert result["settings"]["batch_size"] == 1024 and result["settings"]["scale"] == 20.0


def test_mteb_eng_v2_scores_the_msmarco_fine_tuned_model_made_once(folders, cache, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    """MTEB(eng, v2) cut down to mteb's MSMARCO task (its real loading, from the cache): the same fine-tuned
    model as the msmarco task, so the same score; a dataset mteb cannot read offline is one clear error."""
    import mteb

    import ettin.evaluation as evaluation

    write_cached_dataset(cache, "msmarco-triplets", rows=40)
    for part in ("corpus", "queries", "qrels"):
        write_cached_dataset(cache, f"mteb-msmarco-{part}", rows=12)
    monkeypatch.setattr(evaluation, "mteb_benchmark_tasks", lambda name: [mteb.get_task("MSMARCO")])
    fine_tunes = []
    monkeypatch.setattr(evaluation, "msmarco_finetune",
                        lambda *args, **kwargs: fine_tunes.append(1) or msmarco_finetune(*args, **kwargs))
    tasks = evaluate([folders["encoder"]], tasks="msmarco,mteb_v2_eng", out=tmp_path, limit=4,
                     console=io.StringIO())["models"]["tiny-encoder"]["tasks"]
    benchmark = tasks["mteb_v2_eng"]
    assert fine_tunes == [1]  # one fine-tune for both tasks
    assert (benchmark["category"], benchmark["library"], benchmark["n_examples"]) == ("embedding", "mteb", 1)
    assert benchmark["task_scores"] == {"MSMARCO": tasks["msmarco"]["score"]}
    assert benchmark["mean_by_type"] == {"Retrieval": tasks["msmarco"]["score"]} and benchmark["score"] == \
        tasks["msmarco"]["score"]
    shutil.rmtree(cache / "mteb___msmarco")
    with pytest.raises(EvalError, match=r"mteb task MSMARCO could not read its dataset 'mteb/msmarco'.*"
                                        r"python -m ettin.eval --prefetch --tasks mteb_v2_eng"):
        evaluate([folders["encoder"]], tasks="mteb_v2_eng", out=tmp_path / "again", limit=4, console=io.StringIO())


@pytest.mark.slow
def test_mldr_and_codesearchnet_score_the_msmarco_fine_tuned_model_through_mteb_offline(folders, cache,  # noqa: F811
                                                                                       tmp_path):
    """The encoder table's MLDR (English subset of mteb's MultiLongDocRetrieval, test split) and
    CodeSearchNet (mteb's CodeSearchNetRetrieval, the mean over its six languages): the real mteb tasks read
    the datasets cache, after one MS MARCO fine-tune shared by both."""
    write_cached_dataset(cache, "msmarco-triplets", rows=40)
    for config in [c for c in CACHED if c.startswith((MLDR, CODESEARCHNET))]:
        write_cached_dataset(cache, config, rows=6)
    shutil.rmtree(cache / f"mteb___{CODESEARCHNET}" / "ruby-qrels")
    with pytest.raises(EvalError) as missing:  # the offline check names the configuration and the fix
        evaluate([folders["encoder"]], tasks="mldr,codesearchnet", limit=4)
    assert "'mteb/CodeSearchNetRetrieval' (config 'ruby-qrels')" in str(missing.value)
    assert f"python -m ettin.eval --prefetch --tasks mldr,codesearchnet {folders['encoder']}" in str(missing.value)
    write_cached_dataset(cache, f"{CODESEARCHNET}-ruby-qrels", rows=6)
    tasks = evaluate([folders["encoder"]], tasks="mldr,codesearchnet", out=tmp_path, limit=4,
                     console=io.StringIO())["models"]["tiny-encoder"]["tasks"]
    max_length = json.loads((folders["encoder"] / "config.json").read_text())["max_position_embeddings"]
    for name, mteb_task, subsets in (("mldr", "MultiLongDocRetrieval", ["en"]),
                                     ("codesearchnet", "CodeSearchNetRetrieval", list(CODESEARCHNET_LANGUAGES))):
        result = tasks[name]
        assert (result["metric"], result["split"], result["mteb_task"], result["library"]) == (
            "ndcg@10", "test", mteb_task, "sentence-transformers")
        assert list(result["mteb_subsets"]) == subsets and result["n_examples"] == 6 * len(subsets)
        assert result["score"] == pytest.approx(sum(result["mteb_subsets"].values()) / len(subsets))
        assert result["mteb_scores"]["ndcg_at_10"] == pytest.approx(result["score"]) and 0.0 < result["score"] <= 1.0
        assert (result["n_train_examples"], result["max_seq_length"]) == (16, max_length)
