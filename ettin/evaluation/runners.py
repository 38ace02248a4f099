"""The three ways a task is scored, each through its field's library:

* lm-evaluation-harness (generation and language-modelling tasks): decoders through lm-eval's own
  ``hf`` model, encoders through ``ettin-mlm`` (ettin.evaluation.masked_lm), masked diffusion models
  through ``ettin-mdlm``, prefix LMs through ``ettin-prefix`` (ettin.evaluation.prefix_lm);
* transformers ``Trainer`` + ``AutoModelForSequenceClassification`` (classification by fine-tuning;
  a decoder pools its last token);
* sentence-transformers (retrieval: mean pooling, a short MultipleNegativesRankingLoss fine-tune,
  ``InformationRetrievalEvaluator`` nDCG@10).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ettin.evaluation.models import EvalModel

log = logging.getLogger("ettin")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------
# lm-eval


HARNESS_BATCH_SIZE = 32


def harness_model_args(model: EvalModel, batch_size: int = HARNESS_BATCH_SIZE) -> dict:
    """The lm-eval model arguments of ``model`` (recorded in eval.json): lm-eval's ``hf`` for a decoder,
    with ``add_bos_token=True`` as the Ettin paper ran it; ``ettin-mlm`` for an encoder; ``ettin-mdlm``
    (scored through the MDLM bound) for a model trained with a bound objective; ``ettin-prefix`` (the
    context as its prefix) for a prefix LM."""
    if model.kind == "prefix":
        return {"model": "ettin-prefix", "pretrained": str(model.path), "dtype": "float32",
                "batch_size": batch_size, "device": _device()}
    if model.is_decoder:
        return {"model": "hf", "pretrained": str(model.path), "backend": "causal", "add_bos_token": True,
                "dtype": "float32", "batch_size": batch_size, "device": _device()}
    from ettin.evaluation.masked_lm import DEFAULT_EXTRA_MASKS
    from ettin.objectives import OBJECTIVES

    if model.objective in OBJECTIVES and OBJECTIVES[model.objective].bound:  # scored through its bound
        from ettin.evaluation.diffusion_lm import DEFAULT_BOUND_SAMPLES

        return {"model": "ettin-mdlm", "pretrained": str(model.path), "samples": DEFAULT_BOUND_SAMPLES,
                "seed": 0, "dtype": "float32", "batch_size": batch_size, "device": _device()}
    return {"model": "ettin-mlm", "pretrained": str(model.path), "extra_masks": DEFAULT_EXTRA_MASKS,
            "dtype": "float32", "batch_size": batch_size, "device": _device()}


def harness_model(model: EvalModel, batch_size: int = HARNESS_BATCH_SIZE):
    """The lm-eval model of ``model``, built from ``harness_model_args``."""
    from lm_eval.models.huggingface import HFLM

    from ettin.evaluation.diffusion_lm import DiffusionLMHarness
    from ettin.evaluation.masked_lm import MaskedLMHarness
    from ettin.evaluation.prefix_lm import PrefixLMHarness

    arguments = harness_model_args(model, batch_size)
    kind = arguments.pop("model")
    return {"hf": HFLM, "ettin-mlm": MaskedLMHarness, "ettin-mdlm": DiffusionLMHarness,
            "ettin-prefix": PrefixLMHarness}[kind](**arguments)


@lru_cache(maxsize=4)
def task_manager(include_path: Optional[str]):
    """lm-eval's TaskManager: of lm-eval's own tasks (``None``), or of a folder of task yamls alone.
    Built once per process (indexing lm-eval's yamls takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_path is None)


@dataclass(frozen=True)
class HarnessScores:
    """One lm-eval task's result: {metric: value}, the examples scored and lm-eval's per-example records
    (``doc_id`` and each metric's value), from which ettin.evaluation.uncertainty makes every error."""

    metrics: dict[str, float]
    n_examples: int
    samples: list[dict]


def run_harness_task(lm, task: str, *, include_path: Optional[Path], limit: Optional[int], few_shot: int,
                     seed: int) -> HarnessScores:
    """One lm-eval task through lm-eval's ``simple_evaluate``, with its per-example records. lm-eval's
    own errors are not asked for (``bootstrap_iters=0``): its bootstrap forks a process pool inside a
    process that holds torch's threads, which can hang; the errors come from the per-example records
    (lm-eval's mean_stderr formula for means, a bootstrap for the rest: ettin.evaluation.uncertainty)."""
    from lm_eval import simple_evaluate

    local = {p.stem for p in include_path.glob("*.yaml")} if include_path else set()
    manager = task_manager(str(include_path)) if task in local else task_manager(None)
    results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, num_fewshot=few_shot,
                              limit=limit, bootstrap_iters=0, log_samples=True, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    values = {key.split(",")[0]: value for key, value in results["results"][task].items() if "," in key}
    numbers = {key: float(value) for key, value in values.items() if isinstance(value, (int, float))}
    return HarnessScores(metrics={k: v for k, v in numbers.items() if not k.endswith("_stderr")},
                         n_examples=int(results["n-samples"][task]["effective"]),
                         samples=results["samples"][task])


# ---------------------------------------------------------------------------------------------------
# Classification


def _pairs_text(model: EvalModel, tokenizer, first: list[str], second: Optional[list[str]]):
    """Tokenizer inputs of (first, second) texts. An encoder uses its pair template
    (``[CLS] a [SEP] b [SEP]``); a decoder's template has no separator, so [SEP] is written between."""
    if second is None or not model.is_decoder:
        return first, second
    return [f"{a}{tokenizer.sep_token} {b}" for a, b in zip(first, second)], None


def finetune_classification(model: EvalModel, train: list[dict], evaluation: list[dict], *, num_labels: int,
                            settings: list[dict], score: Callable[[list], float], seed: int,
                            work_dir: Path) -> list[dict]:
    """Fine-tune ``model`` on ``train`` rows ({"text", optional "text_pair", "label"}) once per setting
    (``FinetuneGrid.settings()``), score its predictions for ``evaluation`` with ``score``; return
    ``[{**setting, "score": ...}]`` in the order tried. ``num_labels=1`` is regression (float labels,
    the predicted values are scored)."""
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model.path)

    def dataset(rows: list[dict], max_length: int) -> Dataset:
        first = [r["text"] for r in rows]
        second = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        first, second = _pairs_text(model, tokenizer, first, second)
        encoded = tokenizer(first, second, truncation=True, max_length=max_length)
        labels = [float(r["label"]) if num_labels == 1 else int(r["label"]) for r in rows]
        return Dataset.from_dict({**encoded, "labels": labels})

    tried = []
    for setting in settings:
        classifier = AutoModelForSequenceClassification.from_pretrained(
            model.path, num_labels=num_labels, dtype=torch.float32)
        arguments = TrainingArguments(
            output_dir=str(work_dir), learning_rate=setting["learning_rate"], num_train_epochs=setting["epochs"],
            per_device_train_batch_size=setting["batch_size"], per_device_eval_batch_size=2 * setting["batch_size"],
            weight_decay=setting["weight_decay"], warmup_ratio=setting["warmup_ratio"],
            adam_beta1=setting["adam_betas"][0], adam_beta2=setting["adam_betas"][1],
            adam_epsilon=setting["adam_epsilon"], lr_scheduler_type="linear", seed=seed, data_seed=seed,
            report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=classifier, args=arguments, train_dataset=dataset(train, setting["max_length"]),
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        predictions = np.asarray(trainer.predict(dataset(evaluation, setting["max_length"])).predictions)
        predicted = predictions[:, 0].tolist() if num_labels == 1 else predictions.argmax(-1).tolist()
        tried.append({**setting, "score": float(score(predicted))})
        log.info("%s: fine-tuning %s -> %.4f", model.name, setting, tried[-1]["score"])
    return tried


# ---------------------------------------------------------------------------------------------------
# Retrieval


@dataclass(frozen=True)
class RetrievalSettings:
    learning_rate: float = 5e-5
    epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 256


def retrieval_ndcg_at_10(model: EvalModel, train_pairs: list[dict], queries: dict[str, str],
                         corpus: dict[str, str], relevant: dict[str, list[str]], *,
                         settings: RetrievalSettings, seed: int, work_dir: Path) -> tuple[float, dict[str, float]]:
    """nDCG@10 (cosine) of ``model`` with mean pooling, after a MultipleNegativesRankingLoss
    fine-tune on ``train_pairs`` ({"query", "passage"}; none: no fine-tune), and each query's nDCG@10
    (sentence-transformers' own, whose mean the score is)."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    with warnings.catch_warnings():  # 5.x moved these modules; the old paths work from 3.x to 5.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers
        from sentence_transformers.util import cos_sim

    encoder = SentenceTransformer(str(model.path), device=_device())  # no modules.json: mean pooling
    encoder.max_seq_length = settings.max_length
    if train_pairs:
        arguments = SentenceTransformerTrainingArguments(
            output_dir=str(work_dir), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
            per_device_train_batch_size=settings.batch_size, warmup_ratio=0.1, seed=seed, data_seed=seed,
            batch_sampler=BatchSamplers.NO_DUPLICATES, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        data = Dataset.from_dict({"anchor": [p["query"] for p in train_pairs],
                                  "positive": [p["passage"] for p in train_pairs]})
        SentenceTransformerTrainer(model=encoder, args=arguments, train_dataset=data,
                                   loss=MultipleNegativesRankingLoss(encoder)).train()
    class PerQuery(InformationRetrievalEvaluator):
        """Keeps each query's nDCG@10, computed by the evaluator's own ranking and DCG."""

        def compute_metrics(self, queries_result_list):
            self.per_query = {}
            for query_id, results in zip(self.queries_ids, queries_result_list):
                hits = sorted(results, key=lambda hit: hit["score"], reverse=True)[:10]
                relevant = self.relevant_docs[query_id]
                self.per_query[query_id] = (self.compute_dcg_at_k([int(h["corpus_id"] in relevant) for h in hits], 10)
                                            / self.compute_dcg_at_k([1] * len(relevant), 10))
            return super().compute_metrics(queries_result_list)

    evaluator = PerQuery(
        queries, corpus, {q: set(docs) for q, docs in relevant.items()}, ndcg_at_k=[10], mrr_at_k=[10],
        accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[10], name="ettin", write_csv=False,
        show_progress_bar=False, batch_size=2 * settings.batch_size, score_functions={"cosine": cos_sim})
    scores = evaluator(encoder)
    return float(next(v for k, v in scores.items() if k.endswith("cosine_ndcg@10"))), evaluator.per_query


@dataclass(frozen=True)
class MsmarcoSettings:
    """The paper's MS MARCO fine-tune (retrieval_eval/train_st.py): the ``triplet-hard`` training split less
    1,000 held-out rows (``train_test_split(test_size=1_000, seed=12)``), its first 1,250,000 rows, batch
    1024 without duplicates, CachedMultipleNegativesRankingLoss (mini-batch 256, scale 20), 5% warmup,
    1 epoch, bf16 on a GPU. The script takes the learning rate as an argument without stating the value
    used: 8e-5 is ours (docs/evaluation.md)."""

    learning_rate: float = 8e-5
    batch_size: int = 1024
    mini_batch_size: int = 256
    scale: float = 20.0
    warmup_ratio: float = 0.05
    epochs: float = 1.0
    train_rows: int = 1_250_000
    held_out_rows: int = 1_000
    split_seed: int = 12


def paper_retrieval_encoder(model: EvalModel):
    """SentenceTransformer of ``model`` pooled as the paper's script pools it: mean for an encoder (the
    sentence-transformers default), last token for a decoder."""
    from sentence_transformers import SentenceTransformer, models

    if not model.is_decoder:
        return SentenceTransformer(str(model.path), device=_device())
    transformer = models.Transformer(str(model.path))
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[transformer, pooling], device=_device())


def msmarco_finetune(encoder, triplets, *, settings: MsmarcoSettings, train_rows: int, seed: int,
                     work_dir: Path) -> int:
    """Fine-tune ``encoder`` (in place) on the first ``train_rows`` of the paper's split of ``triplets``
    (columns query, positive, negative); return the rows trained on."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    with warnings.catch_warnings():  # 5.x moved these modules; the old paths work from 3.x to 5.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers

    held_out = min(settings.held_out_rows, len(triplets) // 10)
    train = triplets.train_test_split(test_size=held_out, seed=settings.split_seed)["train"]
    train = train.select(range(min(train_rows, len(train))))
    arguments = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir), num_train_epochs=settings.epochs, learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size, warmup_ratio=settings.warmup_ratio,
        bf16=torch.cuda.is_available(), batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    loss = CachedMultipleNegativesRankingLoss(encoder, mini_batch_size=min(settings.mini_batch_size,
                                                                          settings.batch_size),
                                              scale=settings.scale)
    SentenceTransformerTrainer(model=encoder, args=arguments, train_dataset=train, loss=loss).train()
    return len(train)


def mteb_task(name: str, split: Optional[str] = None, subsets: Sequence[str] = ()):
    """mteb's task ``name``, cut to one evaluation split and to some of its hf subsets (e.g. MLDR's
    ``en``) when given, with its data loaded (from the datasets cache, at the revision mteb pins)."""
    import mteb

    task = mteb.get_task(name, eval_splits=[split] if split else None, hf_subsets=list(subsets) or None)
    task.load_data()
    return task


def mteb_queries(task, split: str) -> int:
    """The queries a loaded mteb retrieval task evaluates on ``split`` (those with relevance judgements),
    over its subsets."""
    return sum(len(task.dataset[subset][split]["queries"]) for subset in task.hf_subsets)


def mteb_benchmark_tasks(name: str) -> list:
    import mteb

    return list(mteb.get_benchmark(name).tasks)


def mteb_task_score(encoder, task) -> tuple[float, dict[str, list[dict]]]:
    """mteb's main score of ``encoder`` on one mteb task (the mean over the splits and subsets the task
    evaluates; mteb 2.x ``mteb.evaluate`` with no result cache, so a score is never another model's),
    and mteb's scores ``{split: [one dict per subset]}``."""
    import mteb

    result = mteb.evaluate(encoder, tasks=[task], cache=None, show_progress_bar=False)
    if result.exceptions:
        raise RuntimeError(f"mteb {task.metadata.name}: {result.exceptions[0]}")
    (task_result,) = result.task_results
    return float(task_result.get_score()), task_result.scores
