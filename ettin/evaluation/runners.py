"""The three ways a task is scored, each through its field's library:

* lm-evaluation-harness (generation and language-modelling tasks): decoders through lm-eval's own
  ``hf`` model, encoders through ``ettin-mlm`` (ettin.evaluation.masked_lm);
* transformers ``Trainer`` + ``AutoModelForSequenceClassification`` (classification by fine-tuning;
  a decoder pools its last token);
* sentence-transformers (retrieval: mean pooling, a short MultipleNegativesRankingLoss fine-tune,
  ``InformationRetrievalEvaluator`` nDCG@10).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ettin.evaluation.models import EvalModel

log = logging.getLogger("ettin")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------
# lm-eval


def harness_model(model: EvalModel, batch_size: int = 32):
    """The lm-eval model of ``model``: lm-eval's ``hf`` (HFLM) for a decoder, ``ettin-mlm`` for an encoder."""
    if model.is_decoder:
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(model.path), backend="causal", batch_size=batch_size, device=_device(),
                    dtype="float32")
    from ettin.evaluation.masked_lm import MaskedLMHarness

    return MaskedLMHarness(str(model.path), batch_size=batch_size, device=_device())


def run_harness(model: EvalModel, tasks: list[str], *, include_path: Optional[Path], limit: Optional[int],
                seed: int) -> dict[str, tuple[dict[str, float], int]]:
    """{task: ({metric: value}, examples scored)} from lm-eval's ``simple_evaluate``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    local = {p.stem for p in include_path.glob("*.yaml")} if include_path else set()
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=not set(tasks) <= local)
    results = simple_evaluate(model=harness_model(model), tasks=list(tasks), task_manager=manager,
                              limit=limit, bootstrap_iters=0, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    out = {}
    for task in tasks:
        metrics = {key.split(",")[0]: float(value) for key, value in results["results"][task].items()
                   if "," in key and "_stderr" not in key}
        out[task] = (metrics, int(results["n-samples"][task]["effective"]))
    return out


# ---------------------------------------------------------------------------------------------------
# Classification


@dataclass(frozen=True)
class FinetuneSettings:
    """ModernBERT/Ettin-style GLUE fine-tuning (AdamW with decoupled weight decay, linear decay after
    a short warmup). Several learning rates = a sweep, chosen on 10% of the training set."""

    learning_rates: tuple[float, ...] = (8e-5,)
    epochs: float = 3.0
    batch_size: int = 32
    weight_decay: float = 1e-5
    warmup_ratio: float = 0.06
    max_length: int = 256


def _pairs_text(model: EvalModel, tokenizer, first: list[str], second: Optional[list[str]]):
    """Tokenizer inputs of (first, second) texts. An encoder uses its pair template
    (``[CLS] a [SEP] b [SEP]``); a decoder's template has no separator, so [SEP] is written between."""
    if second is None or not model.is_decoder:
        return first, second
    return [f"{a}{tokenizer.sep_token} {b}" for a, b in zip(first, second)], None


def finetune_classification(model: EvalModel, train: list[dict], test: list[dict], *, num_labels: int,
                            settings: FinetuneSettings, seed: int, work_dir: Path) -> list[int]:
    """Fine-tune ``model`` on ``train`` rows ({"text", optional "text_pair", "label"}) and return its
    predicted labels for ``test``. With several learning rates, the best on a held-out tenth of
    ``train`` is used."""
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(model.path)

    def dataset(rows: list[dict]) -> Dataset:
        first = [r["text"] for r in rows]
        second = [r["text_pair"] for r in rows] if "text_pair" in rows[0] else None
        first, second = _pairs_text(model, tokenizer, first, second)
        encoded = tokenizer(first, second, truncation=True, max_length=settings.max_length)
        return Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})

    def fit_and_predict(fit: Dataset, predict: Dataset, learning_rate: float) -> np.ndarray:
        classifier = AutoModelForSequenceClassification.from_pretrained(
            model.path, num_labels=num_labels, dtype=torch.float32)
        arguments = TrainingArguments(
            output_dir=str(work_dir), learning_rate=learning_rate, num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=2 * settings.batch_size,
            weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
            lr_scheduler_type="linear", seed=seed, data_seed=seed, report_to=[], save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=classifier, args=arguments, train_dataset=fit,
                          data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train()
        return np.asarray(trainer.predict(predict).predictions).argmax(-1)

    learning_rate = settings.learning_rates[0]
    if len(settings.learning_rates) > 1:
        cut = max(1, len(train) // 10)
        fit, dev = dataset(train[cut:]), dataset(train[:cut])
        gold = np.array([r["label"] for r in train[:cut]])
        scores = {lr: float((fit_and_predict(fit, dev, lr) == gold).mean()) for lr in settings.learning_rates}
        learning_rate = max(scores, key=scores.get)
        log.info("%s: learning rate sweep %s -> %g", model.name, scores, learning_rate)
    return [int(p) for p in fit_and_predict(dataset(train), dataset(test), learning_rate)]


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
                         settings: RetrievalSettings, seed: int, work_dir: Path) -> float:
    """nDCG@10 (cosine) of ``model`` with mean pooling, after a MultipleNegativesRankingLoss
    fine-tune on ``train_pairs`` ({"query", "passage"}; none: no fine-tune)."""
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)

    with warnings.catch_warnings():  # 5.x moved these modules; the old paths work from 3.x to 5.x
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.evaluation import InformationRetrievalEvaluator
        from sentence_transformers.losses import MultipleNegativesRankingLoss
        from sentence_transformers.training_args import BatchSamplers

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
    evaluator = InformationRetrievalEvaluator(
        queries, corpus, {q: set(docs) for q, docs in relevant.items()}, ndcg_at_k=[10], mrr_at_k=[10],
        accuracy_at_k=[1], precision_recall_at_k=[10], map_at_k=[10], name="ettin", write_csv=False,
        show_progress_bar=False, batch_size=2 * settings.batch_size)
    scores = evaluator(encoder)
    return float(next(v for k, v in scores.items() if k.endswith("cosine_ndcg@10")))
