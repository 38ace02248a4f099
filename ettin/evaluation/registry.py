"""Every task ``python -m ettin.eval`` knows, one entry each, and the suites that group them.

A task says how it is scored (category, library), what it reports (metric, direction, split,
few-shot) and which hub datasets it downloads (id and config: what ``--prefetch`` fetches and what an
offline node must have in its cache). A new task is one ``Task`` in ``TASKS``.

``--tasks`` accepts a suite name (``SUITES``), a registered task, or any task lm-eval knows (scored
through lm-eval, its metric ``acc_norm`` where lm-eval has it, else ``acc``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

from ettin.evaluation import smoke_tasks
from ettin.evaluation.models import EvalError

LM_EVAL, TRANSFORMERS, SENTENCE_TRANSFORMERS, MTEB = "lm-eval", "transformers", "sentence-transformers", "mteb"
CATEGORIES = ("generation", "classification", "retrieval", "embedding", "language_modeling")
PAPER = "Ettin paper (arXiv 2507.11412)"


@dataclass(frozen=True)
class Dataset:
    """A hub dataset as ``datasets.load_dataset(id, config)`` downloads it."""

    id: str
    config: Optional[str] = None
    revision: Optional[str] = None  # a pinned hub revision (mteb pins its datasets)

    def __str__(self) -> str:
        return self.id + (f" ({self.config})" if self.config else "")


@dataclass(frozen=True)
class FinetuneGrid:
    """The fine-tuning settings tried for a classification task; every combination is fitted on the
    training split and scored on the evaluation split, the best score is reported (the paper's GLUE
    protocol: GLUE's test labels are not public)."""

    learning_rates: tuple[float, ...]
    epochs: tuple[float, ...]
    batch_size: int
    weight_decay: float
    warmup_ratio: float
    max_length: int
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8

    def settings(self) -> list[dict]:
        return [{"learning_rate": lr, "epochs": epochs, "batch_size": self.batch_size,
                 "weight_decay": self.weight_decay, "warmup_ratio": self.warmup_ratio,
                 "max_length": self.max_length, "adam_betas": list(self.adam_betas),
                 "adam_epsilon": self.adam_epsilon}
                for lr in self.learning_rates for epochs in self.epochs]


# bert24 yamls/finetuning/glue/tasks/*.yaml (the Ettin authors' GLUE configs): every task centred on
# lr 5e-5, 1 epoch, batch 64, weight decay 5e-6, 6% warmup then linear decay to 0, 512 tokens,
# decoupled AdamW betas (0.9, 0.98), eps 1e-6, full training set. The files mark lr, duration, weight
# decay and batch as "hparams to sweep" without listing the values; the grid around the centre is ours
# (docs/evaluation.md).
BERT24_GLUE_GRID = FinetuneGrid(learning_rates=(1e-5, 3e-5, 5e-5, 8e-5), epochs=(1.0, 2.0), batch_size=64,
                                weight_decay=5e-6, warmup_ratio=0.06, max_length=512, adam_betas=(0.9, 0.98),
                                adam_epsilon=1e-6)
SMOKE_GRID = FinetuneGrid(learning_rates=(8e-5,), epochs=(3.0,), batch_size=32, weight_decay=1e-5,
                          warmup_ratio=0.06, max_length=256)


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    library: str
    metric: str
    higher_is_better: bool
    split: str
    datasets: tuple[Dataset, ...] = ()
    few_shot: int = 0
    smoke: bool = False
    source: str = ""  # where the protocol comes from
    # classification: (first text column, second or None), number of labels (1: regression, e.g. STS-B),
    # fine-tuning grid
    text_columns: tuple[str, Optional[str]] = ("", None)
    num_labels: int = 0
    grid: Optional[FinetuneGrid] = None
    train_split: str = "train"
    mteb_task: str = ""  # retrieval scored by mteb's task of this name (after the paper's MS MARCO fine-tune)
    mteb_subsets: tuple[str, ...] = ()  # the mteb task's hf subsets scored (their mean); () for one "default"
    mteb_benchmark: str = ""  # an mteb benchmark (its tasks' datasets are mteb's: --prefetch asks mteb)


def _generative(name: str, metric: str, dataset: Dataset, split: str) -> Task:
    return Task(name, "generation", LM_EVAL, metric, True, split, (dataset,), source=PAPER)


def _glue(name: str, columns: tuple[str, Optional[str]], labels: int, split: str = "validation",
          metric: str = "accuracy") -> Task:
    return Task(name, "classification", TRANSFORMERS, metric, True, split, (Dataset("nyu-mll/glue", name),),
                source=f"{PAPER}; bert24 yamls/finetuning/glue", text_columns=columns, num_labels=labels,
                grid=BERT24_GLUE_GRID)


# The paper's decoder table (assets/decoder_results.*): lm-eval at commit 867413f, zero-shot, the
# metric each column reports (docs/evaluation.md says why). Dataset ids are the ones lm-eval's task
# yamls load (its current 0.4.x release).
PAPER_GENERATIVE = (
    _generative("arc_challenge", "acc_norm", Dataset("allenai/ai2_arc", "ARC-Challenge"), "test"),
    _generative("hellaswag", "acc_norm", Dataset("Rowan/hellaswag"), "validation"),
    _generative("lambada_openai", "acc", Dataset("EleutherAI/lambada_openai", "default"), "test"),
    _generative("openbookqa", "acc_norm", Dataset("allenai/openbookqa", "main"), "test"),
    _generative("piqa", "acc_norm", Dataset("baber/piqa"), "validation"),
    _generative("sciq", "acc_norm", Dataset("allenai/sciq"), "test"),
    _generative("social_iqa", "acc", Dataset("lighteval/siqa"), "validation"),
    _generative("triviaqa", "exact_match", Dataset("mandarjoshi/trivia_qa", "rc.nocontext"), "validation"),
    _generative("winogrande", "acc", Dataset("allenai/winogrande", "winogrande_xl"), "validation"),
    _generative("wsc273", "acc", Dataset("lighteval/winograd_wsc", "wsc273"), "test"),
)
# The paper's encoder table: SST-2, MNLI and the GLUE average (GLUE tasks via datasets, nyu-mll/glue).
PAPER_GLUE = (
    _glue("cola", ("sentence", None), 2, metric="matthews_correlation"),
    _glue("sst2", ("sentence", None), 2),
    _glue("mrpc", ("sentence1", "sentence2"), 2),
    _glue("qqp", ("question1", "question2"), 2),
    _glue("mnli", ("premise", "hypothesis"), 3, split="validation_matched"),
    _glue("qnli", ("question", "sentence"), 2),
    _glue("rte", ("sentence1", "sentence2"), 2),
    _glue("stsb", ("sentence1", "sentence2"), 1, metric="spearman"),  # regression: one output
)
SMOKE = (
    Task(smoke_tasks.CLOZE, "generation", LM_EVAL, "acc", True, "test", smoke=True, source="ettin smoke suite"),
    Task(smoke_tasks.LM, "language_modeling", LM_EVAL, "word_perplexity", False, "test", smoke=True,
         source="ettin smoke suite"),
    Task(smoke_tasks.NLI, "classification", TRANSFORMERS, "accuracy", True, "test", smoke=True,
         source="ettin smoke suite", text_columns=("premise", "hypothesis"), num_labels=3, grid=SMOKE_GRID),
    Task(smoke_tasks.RETRIEVAL, "retrieval", SENTENCE_TRANSFORMERS, "ndcg@10", True, "test", smoke=True,
         source="ettin smoke suite"),
    Task(smoke_tasks.CONTINUATION, "generation", LM_EVAL, "chrf", True, "test", smoke=True,
         source="ettin smoke suite"),
)
# Not the paper's protocol: MS MARCO v1.1 validation queries ranked among the passages retrieved for all
# evaluated queries, after a short in-batch-negatives fine-tune (ettin's own, cheap).
MSMARCO_POOL = Task("msmarco_pool", "retrieval", SENTENCE_TRANSFORMERS, "ndcg@10", True, "validation",
                    (Dataset("microsoft/ms_marco", "v1.1"),), source="ettin (small-pool protocol, not the paper's)")

def _mteb_retrieval_datasets(path: str, revision: str, subsets: tuple[str, ...]) -> tuple[Dataset, ...]:
    """The hub configs mteb's retrieval loader reads (mteb.abstasks.retrieval_dataset_loaders): per hf
    subset ``SUBSET-corpus``, ``SUBSET-queries`` and ``SUBSET-qrels``; a task without subsets has
    ``corpus``, ``queries`` and ``default`` (the qrels)."""
    if not subsets:
        return tuple(Dataset(path, config, revision) for config in ("corpus", "queries", "default"))
    return tuple(Dataset(path, f"{subset}-{part}", revision) for subset in subsets
                 for part in ("corpus", "queries", "qrels"))


def _paper_retrieval(name: str, split: str, mteb_task: str, path: str, revision: str,
                     subsets: tuple[str, ...] = (), extra: tuple[Dataset, ...] = ()) -> Task:
    return Task(name, "retrieval", SENTENCE_TRANSFORMERS, "ndcg@10", True, split,
                (*extra, *_mteb_retrieval_datasets(path, revision, subsets)),
                source=f"{PAPER}; retrieval_eval/train_st.py; mteb {mteb_task}", mteb_task=mteb_task,
                mteb_subsets=subsets)


# The paper's retrieval (JHU-CLSP/ettin-encoder-vs-decoder retrieval_eval/train_st.py): fine-tune on MS
# MARCO hard triplets with CachedMultipleNegativesRankingLoss for 1 epoch, then nDCG@10 through mteb's
# tasks, each at the revision mteb pins: MS MARCO dev (8.8M passages; the scaling figure) and the encoder
# table's MLDR (English: mteb's MultiLongDocRetrieval, subset en; its test split, 800 queries over 200k
# long Wikipedia articles) and CodeSearchNet (mteb's CodeSearchNetRetrieval: the mean over its six
# languages, test split).
MTEB_MSMARCO_REVISION = "c5a29a104738b98a9e76336939199e264163d4a0"
MTEB_MLDR_REVISION = "837028901907a7d419b4ab906f28e011ce1cc824"
MTEB_CODESEARCHNET_REVISION = "68e8f0731a656fa4bd5b7c81936d95ad48a39bfe"
CODESEARCHNET_LANGUAGES = ("python", "javascript", "go", "ruby", "java", "php")
MSMARCO_TRIPLETS = Dataset("sentence-transformers/msmarco-co-condenser-margin-mse-sym-mnrl-mean-v1", "triplet-hard")
PAPER_RETRIEVAL = _paper_retrieval("msmarco", "dev", "MSMARCO", "mteb/msmarco", MTEB_MSMARCO_REVISION,
                                   extra=(MSMARCO_TRIPLETS,))
PAPER_MLDR = _paper_retrieval("mldr", "test", "MultiLongDocRetrieval", "mteb/MultiLongDocRetrieval",
                              MTEB_MLDR_REVISION, ("en",))
PAPER_CODESEARCHNET = _paper_retrieval("codesearchnet", "test", "CodeSearchNetRetrieval",
                                       "mteb/CodeSearchNetRetrieval", MTEB_CODESEARCHNET_REVISION,
                                       CODESEARCHNET_LANGUAGES)

# The encoder table's MTEB columns: the MS MARCO fine-tuned model (above) on mteb's MTEB(eng, v2), the
# mean of its 41 tasks' main scores, and the means of its clustering and retrieval tasks.
PAPER_MTEB = Task("mteb_v2_eng", "embedding", MTEB, "mean_main_score", True, "mteb's per task",
                  source=f"{PAPER}; mteb.get_benchmark('MTEB(eng, v2)')", mteb_benchmark="MTEB(eng, v2)")

PAPER_RETRIEVAL_TASKS = (PAPER_RETRIEVAL, PAPER_MLDR, PAPER_CODESEARCHNET)
TASKS: dict[str, Task] = {t.name: t for t in (*SMOKE, *PAPER_GENERATIVE, *PAPER_GLUE, *PAPER_RETRIEVAL_TASKS,
                                              PAPER_MTEB, MSMARCO_POOL)}
SUITES: dict[str, tuple[str, ...]] = {
    "offline": tuple(t.name for t in SMOKE),
    "ettin-paper": tuple(t.name for t in (*PAPER_GENERATIVE, *PAPER_GLUE, *PAPER_RETRIEVAL_TASKS, PAPER_MTEB)),
}


def lm_eval_task(name: str) -> Task:
    """A task lm-eval knows that is not registered here: zero-shot, the metric chosen after the run."""
    return Task(name, "generation", LM_EVAL, "acc_norm|acc", True, "lm-eval's default",
                source="lm-eval task (not registered in ettin)")


@lru_cache(maxsize=1)
def lm_eval_index() -> dict:
    """{name: entry} of every task, group and tag lm-eval knows (indexing its yamls takes seconds)."""
    from ettin.evaluation.runners import task_manager

    return task_manager(None).task_index


def resolve_tasks(spec: str | list[str]) -> list[Task]:
    """``spec``: a suite name, or task names (a comma-separated string or a list). An unknown name is an
    error listing the close names."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise EvalError(f"no tasks given: use --tasks with a suite ({', '.join(SUITES)}) or task names")
    tasks: list[Task] = []
    for name in names:
        if name in SUITES:
            tasks.extend(TASKS[t] for t in SUITES[name])
        elif name in TASKS:
            tasks.append(TASKS[name])
        else:
            if name not in lm_eval_index():
                close = difflib.get_close_matches(name, list(dict.fromkeys([*SUITES, *TASKS, *lm_eval_index()])), n=5,
                                                cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise EvalError(f"unknown task {name!r}{hint} (python -m ettin.eval --list-tasks lists the "
                                "suites and registered tasks; any lm-eval task name is accepted too)")
            tasks.append(lm_eval_task(name))
    return list({t.name: t for t in tasks}.values())


def suite_name(spec: str | list[str]) -> str:
    return spec if isinstance(spec, str) and spec in SUITES else "custom"


def _datasets_described(task: Task) -> str:
    if task.mteb_benchmark:
        return f"those of mteb's {task.mteb_benchmark}"
    configs: dict[str, list[str]] = {}  # one entry per dataset id, its configs in order
    for dataset in task.datasets:
        configs.setdefault(dataset.id, []).extend([dataset.config] if dataset.config else [])
    return "; ".join(f"{dataset_id} ({', '.join(names)})" if names else dataset_id
                     for dataset_id, names in configs.items()) or "none (generated offline)"


def list_tasks() -> str:
    """The text ``--list-tasks`` prints: every suite, then every task with how it is scored."""
    lines = ["suites:"]
    lines += [f"  {name:<12} {', '.join(tasks)}" for name, tasks in SUITES.items()]
    lines += ["", "tasks (any lm-eval task name is accepted too):"]
    rows = [("task", "category", "library", "metric", "direction", "split", "shots", "datasets downloaded")]
    for task in TASKS.values():
        rows.append((task.name + (" *" if task.smoke else ""), task.category, task.library, task.metric,
                     "higher better" if task.higher_is_better else "lower better", task.split,
                     str(task.few_shot), _datasets_described(task)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("* smoke task: generated from the built-in corpus; checks the evaluation path, not a benchmark")
    return "\n".join(lines)
