"""python -m ettin.bench gpu: training throughput on one device, every fast path and the peer, in one
bounded run.

    python -m ettin.bench gpu [--quick] [--json OUT] [--device cpu|cuda] [--budget-s S] [--only REGEX]

What is timed: whole training steps (forward + backward + ``ettin.optim.stable_adamw.StableAdamW`` step; ours
through training's own ``ettin.train.step.TrainStep``), bf16
autocast over fp32 weights on CUDA (fp32 on CPU), on micro-batches built from the built-in corpus
(ettin.data.corpus, tokenized by a BPE trained on it at start, cut into rows by
``ettin.data.shards.chunk_document`` and collated by the training collators: MLM 30 %, CLM):

* ``rows``: ``micro_batch`` rows per micro-batch (Ettin's per-GPU micro-batch of the size and
  phase), the real row lengths, unpadded; the peer gets the same rows padded;
* ``packed``: whole rows filling ``micro_batch * seq_len`` tokens (``ettin.data.loader.pack_rows``, as training packs).

Shapes (CUDA): 150m at 1024 (both objectives, both layouts), 1b at 1024, 150m at 8000. Sides: ours
for each attention backend available (sdpa, flex, flash when installed), with and without
per-layer ``torch.compile``; the chunked loss by default and once the plain one; transformers'
``ModernBertForMaskedLM`` (as shipped and with ``sparse_prediction``) / ``ModernBertDecoderForCausalLM``
(sdpa, uncompiled) on the same weights (``ettin.model.hub.convert_state_dict``), after a fp32 loss check on
the same batch.

Per case: tokens/s/device (real tokens; the time of whole rounds over 3 different micro-batches,
2 on CPU, synchronised at the ends), MFU (``ettin.model.flops`` window-aware FLOPs on real tokens over the peak
table there; ETTIN_PEAK_TFLOPS overrides), peak memory, the ratio to the fastest transformers side
of the same shape and objective, the ratio to Ettin's own tokens/s/GPU for the size (docs/benchmarks.md,
anchors: 150m 296k on H100), warm-up seconds (compilation; excluded from the timing), host syncs in
one step (CUDA: ``torch.cuda.set_sync_debug_mode``; CPU: the aten ops that need a device value)
and Dynamo graph breaks. Cases run in priority order; one that would overrun ``--budget-s`` is
skipped and listed. On CPU, ``--quick`` runs tiny shapes in seconds and "compile" is Dynamo with
its ``eager`` backend (graph capture and graph breaks checked, no code generated).
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ettin.model.config import model_config, size_value
from ettin.objectives.collate import IGNORE_INDEX, CLMCollator, MLMCollator
from ettin.data.corpus import builtin_documents
from ettin.data.loader import pack_rows
from ettin.data.shards import chunk_document
from ettin.data.tokenizer import SpecialIds, special_ids, train_tokenizer
from ettin.model.flops import peak_flops_per_device, training_flops
from ettin.model.modernbert import ModernBert
from ettin.optim.stable_adamw import StableAdamW, param_groups
from ettin.train.step import StepSettings, TrainStep

# Ettin's average training tokens/s per H100 (docs/benchmarks.md, anchors: 2T tokens over
# Ettin's published wall-clock hours on 4 GPUs).
ETTIN_TOKENS_PER_S = {"17m": 985_000, "32m": 655_000, "68m": 463_000, "150m": 296_000,
                      "400m": 146_000, "1b": 64_000}
MASK_RATE = 0.3
# Distinct micro-batches per case, cycled: realistic layouts, and compile's dynamic shapes.
MICRO_BATCHES = {"cuda": 3, "cpu": 2}
PEERS = ("transformers", "transformers_sparse")


@dataclass(frozen=True)
class Shape:
    size: str
    seq_len: int
    rows: int  # rows per micro-batch; packed: rows * seq_len tokens

    @property
    def name(self) -> str:
        return f"{self.size}@{self.seq_len}"


def shapes(device: str, quick: bool) -> dict[str, Shape]:
    """base (150m at 1024), large (1b at 1024), long (150m at 8000): Ettin's micro-batches."""
    if device == "cpu":
        return {"base": Shape("tiny", 128, 4), "large": Shape("17m", 128, 2), "long": Shape("tiny", 512, 2)}
    return {"base": Shape("150m", 1024, size_value("150m", "micro_batch.pretrain")),
            "large": Shape("1b", 1024, size_value("1b", "micro_batch.pretrain")),
            "long": Shape("150m", 8000, size_value("150m", "micro_batch.extension"))}


@dataclass(frozen=True)
class Case:
    shape: Shape
    objective: str  # mlm | clm
    packing: str  # rows | packed
    side: str = "ours"  # ours | transformers | transformers_sparse
    attn: str = "sdpa"
    compile: bool = False
    loss: str = "chunked"

    @property
    def name(self) -> str:
        if self.side != "ours":
            side = {"transformers": "transformers", "transformers_sparse": "transformers sparse_pred"}[self.side]
        else:
            side = f"ours {self.attn}{' compiled' if self.compile else ''}{' plain loss' if self.loss == 'plain' else ''}"
        return f"{self.shape.name} {self.objective} {self.packing:<6} {side}"


def backends(device: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The attention backends to measure, and (backend, why not) for the others."""
    skipped = []
    found = ["sdpa"]
    if device == "cuda":
        found.append("flex")
    else:
        skipped.append(("flex", "torch FlexAttention has no backward pass on CPU"))
    try:
        import flash_attn  # noqa: F401

        if device == "cuda":
            found.append("flash")
        else:
            skipped.append(("flash", "flash-attn runs on CUDA only"))
    except ImportError:
        skipped.append(("flash", "flash-attn is not installed"))
    return found, skipped


def plan(device: str, quick: bool, attns: list[str]) -> list[Case]:
    """Every case, most important first (the budget cuts from the end)."""
    s = shapes(device, quick)
    base, large, long = s["base"], s["large"], s["long"]
    fast = [a for a in attns if a != "sdpa"]
    cases = []
    for objective in ("mlm", "clm"):  # the peers and ours on the same rows
        peers = ["transformers_sparse", "transformers"] if objective == "mlm" else ["transformers"]
        cases += [Case(base, objective, "rows", side) for side in peers]
        cases += [Case(base, objective, "rows"), Case(base, objective, "packed")]
    cases += [Case(base, objective, "packed", compile=True) for objective in ("mlm", "clm")]  # the headline
    # Then one case of each other shape and the other backends at the headline shape; 8000 with a
    # varlen kernel first (sdpa's [rows, T, T] grid is mostly padding when short documents are packed).
    varlen = next((a for a in ("flash", "flex") if a in attns), "sdpa")
    cases += [Case(large, "mlm", "packed", compile=True), Case(long, "clm", "packed", attn=varlen, compile=True)]
    cases += [Case(base, objective, "packed", attn=a, compile=True) for a in fast for objective in ("mlm", "clm")]
    cases += [Case(large, "clm", "packed", compile=True), Case(long, "mlm", "packed", attn=varlen, compile=True)]
    cases += [Case(long, objective, "packed", compile=True) for objective in ("mlm", "clm")]
    cases.append(Case(base, "clm", "packed", compile=True, loss="plain"))
    cases.append(Case(long, "clm", "packed", compile=True, loss="plain"))  # the memory the chunked loss saves
    for shape in (large, long):
        for objective in ("mlm", "clm"):
            cases += [Case(shape, objective, "packed", attn=a, compile=True) for a in fast]
    for objective in ("mlm", "clm"):
        cases += [Case(base, objective, "packed", attn=a) for a in fast]
    for shape in (large, long):
        for objective in ("mlm", "clm"):
            cases += [Case(shape, objective, "rows", "transformers"), Case(shape, objective, "rows")]
    for objective in ("mlm", "clm"):
        cases.append(Case(base, objective, "rows", compile=True))
    if quick:  # the base shape without compiled rows, and one case of each other shape
        keep = {(large, "mlm", "packed", "ours", True), (long, "clm", "packed", "ours", True)}
        cases = [c for c in cases if (c.shape == base and not (c.compile and c.packing == "rows"))
                 or (c.shape, c.objective, c.packing, c.side, c.compile) in keep]
        if device == "cpu":  # Dynamo's tracing is the slow part on CPU: compiled, the two headline cases only
            cases = [c if not c.compile or (c.shape == base and c.loss == "chunked") else replace(c, compile=False)
                     for c in cases]
    return list(dict.fromkeys(cases))


# ------------------------------------------------------------------------------------------------
# Data: the built-in corpus as training rows and micro-batches


@dataclass
class Corpus:
    documents: list[np.ndarray]  # token ids, no specials
    ids: SpecialIds
    vocab_size: int

    def rows(self, seq_len: int, seed: int = 0) -> list[tuple[int, np.ndarray]]:
        """The prepared rows of every document (chunks of at most ``seq_len``), in a seeded order."""
        rows = [row for doc in self.documents for row in chunk_document(doc, seq_len, self.ids.cls, self.ids.sep)]
        order = np.random.default_rng(seed).permutation(len(rows))
        return [(i, rows[j]) for i, j in enumerate(order)]


def load_corpus(quick: bool) -> Corpus:
    texts = [text for _, text in builtin_documents(max_chars=300_000 if quick else None)]
    with tempfile.TemporaryDirectory() as directory:
        tokenizer = train_tokenizer(texts, 1024 if quick else 16384, directory)
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return Corpus([np.asarray(e.ids, dtype=np.int64) for e in encoded], special_ids(tokenizer), len(tokenizer))


def micro_batch_rows(rows: list, shape: Shape, packing: str, count: int) -> list[list]:
    """The first ``count`` micro-batches: ``shape.rows`` rows each, or packed as the loader packs."""
    if packing == "packed":
        bounds = np.cumsum([0, *pack_rows([len(t) for _, t in rows], shape.rows * shape.seq_len)])
        groups = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # the loader's own packing
        return groups[:count] if len(groups) == 1 else groups[:min(count, len(groups) - 1)]  # the last is a remainder
    return [rows[i:i + shape.rows] for i in range(0, min(len(rows), shape.rows * count), shape.rows)]


@dataclass
class MicroBatch:
    inputs: dict  # model keyword arguments, on the device
    tokens: int  # real tokens
    flops: float  # training FLOPs of ours (window-aware, real tokens)
    targets: int  # labelled positions
    rows: int


def collate(corpus: Corpus, case: Case, groups: list[list], device: str, config) -> list[MicroBatch]:
    causal = case.objective == "clm"
    peer = case.side != "ours"
    if causal:
        collator = CLMCollator(corpus.ids, unpadded=not peer, vocab_size=corpus.vocab_size)
    else:
        collator = MLMCollator(corpus.ids, corpus.vocab_size, MASK_RATE, seed=0, unpadded=not peer)
    batches = []
    for group in groups:
        inputs = collator(group)
        if peer:
            mask = inputs["attention_mask"].bool()
            lengths = mask.sum(1).tolist()
            labels = inputs["labels"]
            if causal:  # transformers shifts the labels itself
                inputs["labels"] = inputs["input_ids"].masked_fill(~mask, IGNORE_INDEX)
                inputs["use_cache"] = False
            n_targets = int((labels != IGNORE_INDEX).sum())
        else:
            lengths = torch.diff(inputs["cu_seqlens"]).tolist()
            n_targets = len(inputs["target_index"])
            inputs["causal"] = causal
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        batches.append(MicroBatch(inputs, sum(lengths), training_flops(config, lengths, n_targets, causal),
                                  n_targets, len(lengths)))
    return batches


# ------------------------------------------------------------------------------------------------
# Measuring


class HostSyncs(TorchDispatchMode):
    """Counts the aten ops that need a value or a size from the device (CPU stand-in for CUDA's
    sync debug mode): ``_local_scalar_dense`` (``.item()``, ``int()``, ``bool()`` of a tensor),
    ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave``
    without ``output_size``; and ``lift_fresh``, a tensor made from host data (``torch.tensor(x)``):
    on a GPU its copy from pageable memory waits for the device's queue to drain."""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
           "unique_consecutive", "unique_dim", "lift_fresh"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in self.OPS:
            self.found.append(name)
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else [])):
            self.found.append("index with a boolean mask")
        elif name == "repeat_interleave" and kwargs.get("output_size", args[-1] if len(args) > 2 else None) is None:
            self.found.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def count_host_syncs(step: Callable[[], None], device: str) -> Optional[int]:
    """Host-device synchronisations during one call of ``step``."""
    if device != "cuda":
        with HostSyncs() as syncs:
            step()
        return len(syncs.found)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def build_config(case: Case, corpus: Corpus, device: str):
    """The size's config with the corpus tokenizer's special ids; on CPU also its vocabulary size
    (a multiple of 64) instead of Ettin's 50,368, so tiny models are not all vocabulary projection."""
    ids = corpus.ids
    vocab = {} if device == "cuda" else {"vocab_size": -(-corpus.vocab_size // 64) * 64}
    return model_config(case.shape.size, attn_implementation=case.attn, causal=case.objective == "clm",
                        pad_token_id=ids.pad, bos_token_id=ids.cls, eos_token_id=ids.sep,
                        mask_token_id=ids.mask, **vocab)


def build_model(case: Case, corpus: Corpus, device: str) -> torch.nn.Module:
    from ettin.bench.peer import peer_model

    torch.manual_seed(0)  # every case of a size starts from the same weights
    with torch.device(device):
        ours = ModernBert(build_config(case, corpus, device), loss_implementation=case.loss)
        if case.side == "ours":
            return ours.train()
        return peer_model(ours, case.objective, "sdpa", sparse_prediction=case.side == "transformers_sparse").train()


def check_peer_loss(case: Case, peer: torch.nn.Module, corpus: Corpus, group: list, device: str) -> dict:
    """fp32 losses of ours and the peer on the same micro-batch; raises when they disagree."""
    from ettin.bench.peer import check_losses, loss_of

    ours_case = replace(case, side="ours", attn="sdpa", loss="plain")
    ours = build_model(ours_case, corpus, device)
    losses = {"ours": loss_of(ours, collate(corpus, ours_case, [group], device, ours.config)[0].inputs),
              "transformers": loss_of(peer, collate(corpus, case, [group], device, ours.config)[0].inputs)}
    difference, tolerance = check_losses(losses)
    return {**losses, "max_difference": difference, "tolerance": tolerance}


@dataclass
class Timing:
    warmup_rounds: int
    min_rounds: int
    max_rounds: int
    min_seconds: float


def timing(device: str, quick: bool) -> Timing:
    if device == "cpu":
        return Timing(warmup_rounds=0, min_rounds=1, max_rounds=1, min_seconds=0.0)
    return Timing(warmup_rounds=1, min_rounds=2, max_rounds=30, min_seconds=1.0 if quick else 2.0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, corpus: Corpus, rows: list, device: str, quick: bool) -> dict:
    model = build_model(case, corpus, device)
    config = build_config(case, corpus, device)
    groups = micro_batch_rows(rows, case.shape, case.packing, MICRO_BATCHES[device])
    result: dict = {"case": case.name, **case_fields(case)}
    if case.side != "ours":
        result["loss_check"] = check_peer_loss(case, model, corpus, groups[0], device)
    batches = collate(corpus, case, groups, device, config)
    optimizer = StableAdamW(param_groups(model, 0.01), lr=1e-4, weight_decay=0.01)

    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    if case.side == "ours":  # training's own step: the token-normalised loss, counters on the device
        train_step = TrainStep(model, optimizer, StepSettings(lr=1e-4, lr_multiplier=lambda tokens: 1.0, peak_lr=1e-4), forward_context=autocast)

        def step(batch: MicroBatch) -> None:
            train_step([batch.inputs], tokens_before=0, targets=[batch.targets], rows=[batch.rows])
    else:
        def step(batch: MicroBatch) -> None:
            with autocast():
                loss = model(**batch.inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    import torch._dynamo

    if case.compile:
        from ettin.parallel.speedups import apply_speedups

        torch._dynamo.reset()
        apply_speedups(model, compile=True, activation_checkpointing=False,
                       backend="inductor" if device == "cuda" else "eager")
    counters = torch._dynamo.utils.counters
    breaks_before = sum(counters["graph_break"].values())
    graphs_before = counters["stats"]["unique_graphs"]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timing(device, quick)
    started = time.perf_counter()
    for _ in range(t.warmup_rounds + case.compile):  # compiled: one round for the static, one for the dynamic graphs
        for batch in batches:
            step(batch)
    sync(device)
    warmup = time.perf_counter() - started

    rounds, seconds = 0, 0.0
    started = time.perf_counter()
    while rounds < t.max_rounds and (rounds < t.min_rounds or seconds < t.min_seconds):
        for batch in batches:
            step(batch)
        sync(device)
        rounds += 1
        seconds = time.perf_counter() - started
    tokens = rounds * sum(b.tokens for b in batches)
    flops = rounds * sum(b.flops for b in batches)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    result.update(
        micro_batches=len(batches), tokens_per_micro_batch=round(sum(b.tokens for b in batches) / len(batches)),
        timed_steps=rounds * len(batches), timed_tokens=tokens, timed_s=round(seconds, 6), warmup_s=round(warmup, 2),
        tokens_per_s=round(tokens / seconds), tflops_per_s=round(flops / seconds / 1e12, 3),
        peak_memory_gib=None if peak is None else round(peak / 2**30, 2),
        host_syncs_per_step=None if case.compile and device != "cuda" else count_host_syncs(
            lambda: step(batches[0]), device),
        graph_breaks=sum(counters["graph_break"].values()) - breaks_before,
        compiled_graphs=counters["stats"]["unique_graphs"] - graphs_before,
    )
    return result


def case_fields(case: Case) -> dict:
    fields = asdict(case)
    fields["shape"] = case.shape.name
    fields["size"], fields["seq_len"], fields["rows"] = case.shape.size, case.shape.seq_len, case.shape.rows
    return fields


def estimate_s(case: Case, done: list[dict], device: str) -> float:
    """Seconds a case will take: the last finished case of its kind (shape, compiled or not), else a
    guess on the safe side."""
    for r in reversed(done):
        if "tokens_per_s" in r and r["shape"] == case.shape.name and r["compile"] == case.compile:
            return r["wall_s"]
    if device == "cpu":
        return 10.0 if case.compile else 3.0
    return {"tiny": 10.0, "17m": 20.0}.get(case.shape.size, 90.0 if case.compile else 25.0)


def add_ratios(results: list[dict], peak: Optional[float], device: str) -> None:
    """MFU, the ratio to the fastest transformers side of the same shape and objective, and (CUDA)
    to Ettin's H100 figure."""
    for r in results:
        if "tokens_per_s" not in r:
            continue
        r["mfu"] = None if peak is None else round(r["tflops_per_s"] * 1e12 / peak, 4)
        peers = [p["tokens_per_s"] for p in results if "tokens_per_s" in p and p["side"] in PEERS
                 and (p["shape"], p["objective"]) == (r["shape"], r["objective"])]
        r["ratio_vs_transformers"] = round(r["tokens_per_s"] / max(peers), 3) if peers else None
        anchor = ETTIN_TOKENS_PER_S.get(r["size"]) if device == "cuda" else None
        r["ratio_vs_ettin"] = round(r["tokens_per_s"] / anchor, 3) if anchor else None


def run(device: str, quick: bool, budget_s: float, only: Optional[str] = None,
        progress: Callable[[dict], None] = lambda report: None) -> dict:
    """Every case of the plan (whose name matches the regular expression ``only``) that fits the
    budget; ``progress`` gets the report so far after each."""
    import transformers

    from ettin.bench.peer import device_name

    started = time.perf_counter()
    attns, skipped_backends = backends(device)
    cases = [c for c in plan(device, quick, attns) if only is None or re.search(only, c.name)]
    if not cases:
        raise ValueError(f"--only {only!r} matches no case; the names look like "
                         f"{plan(device, quick, attns)[0].name!r}")
    corpus = load_corpus(quick)
    peak = peak_flops_per_device() if device == "cuda" else None
    rows_by_len: dict[int, list] = {}
    results: list[dict] = []
    skipped = [{"case": f"attention {a}", "reason": why} for a, why in skipped_backends]

    def report() -> dict:
        add_ratios(results, peak, device)
        return {
            "benchmark": "gpu", "device": device, "device_name": device_name(device), "quick": quick,
            "dtype": "bf16 autocast, fp32 weights" if device == "cuda" else "fp32",
            "peak_tflops": None if peak is None else peak / 1e12,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
            "corpus": {"documents": len(corpus.documents),
                       "tokens": int(sum(len(d) for d in corpus.documents)),
                       "tokenizer_vocab": corpus.vocab_size},
            "budget_s": budget_s, "elapsed_s": round(time.perf_counter() - started, 1),
            "ettin_tokens_per_s": ETTIN_TOKENS_PER_S, "results": results, "skipped": skipped,
        }

    for case in cases:
        elapsed = time.perf_counter() - started
        need = estimate_s(case, results, device)
        if elapsed + need > budget_s:
            skipped.append({"case": case.name, "reason": f"time budget: needs ~{need:.0f} s, "
                                                          f"{budget_s - elapsed:.0f} s left"})
            continue
        rows = rows_by_len.setdefault(case.shape.seq_len, corpus.rows(case.shape.seq_len))
        case_started = time.perf_counter()
        try:
            result = run_case(case, corpus, rows, device, quick)
        except torch.cuda.OutOfMemoryError:
            result = {"case": case.name, **case_fields(case), "error": "out of memory"}
        except Exception as error:  # one failing backend must not cost the other figures
            result = {"case": case.name, **case_fields(case), "error": f"{type(error).__name__}: {error}"[:500]}
        result["wall_s"] = round(time.perf_counter() - case_started, 1)
        results.append(result)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(format_row(result, header=len(results) == 1), file=sys.stderr, flush=True)
        progress(report())
    return report()


# ------------------------------------------------------------------------------------------------
# Output


COLUMNS = [("case", 48), ("tok/µb", 8), ("tokens/s", 11), ("MFU", 7), ("peak GiB", 9), ("vs HF", 7),
           ("vs Ettin", 9), ("warm-up", 8), ("syncs", 6), ("breaks", 7)]


def format_row(r: dict, header: bool = False) -> str:
    head = "".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(COLUMNS))
    if "error" in r:
        line = f"{r['case']:<48}  {r['error']}"
    else:
        def num(value, fmt):
            return "-" if value is None else format(value, fmt)

        cells = [r["case"], f"{r['tokens_per_micro_batch']:,}", f"{r['tokens_per_s']:,}",
                 num(r.get("mfu"), ".1%"), num(r["peak_memory_gib"], ".1f"),
                 num(r.get("ratio_vs_transformers"), ".2f"), num(r.get("ratio_vs_ettin"), ".2f"),
                 f"{r['warmup_s']:.1f}s", num(r["host_syncs_per_step"], "d"), f"{r['graph_breaks']}"]
        line = "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))
    return f"{head}\n{line}" if header else line


def print_report(report: dict) -> None:
    print(f"\n{report['device_name']}, torch {report['versions']['torch']}, transformers "
          f"{report['versions']['transformers']}; {report['dtype']}; peak "
          f"{report['peak_tflops'] or '-'} TFLOP/s; {report['elapsed_s']} s of a {report['budget_s']:.0f} s budget")
    print(f"built-in corpus: {report['corpus']['documents']:,} documents, {report['corpus']['tokens']:,} "
          f"tokens (BPE vocab {report['corpus']['tokenizer_vocab']:,}); MLM {MASK_RATE:.0%}")
    print("tokens/s: real tokens per second on this device, whole steps (forward, backward, StableAdamW); "
          "vs HF: / the fastest transformers side of the shape and objective; vs Ettin: / Ettin's "
          "tokens/s/GPU for the size (150m 296k, 1b 64k on H100); warm-up (compilation) is not timed; "
          "syncs: host-device syncs in one step")
    for i, r in enumerate(report["results"]):
        print(format_row(r, header=i == 0))
    for r in report["results"]:
        if "loss_check" in r:
            c = r["loss_check"]
            print(f"loss check {r['case'].strip()}: ours {c['ours']:.6f} transformers {c['transformers']:.6f} "
                  f"(difference {c['max_difference']:.2g} <= {c['tolerance']:.2g})")
    for s in report["skipped"]:
        print(f"skipped: {s['case']}: {s['reason']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.bench gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="the base shape and one case of the others")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting cases after this many seconds of the run (default cuda 420, cpu 120)")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="only the cases whose name matches, e.g. '150m@1024 clm packed'")
    parser.add_argument("--json", default=None, help="also write everything to this file")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    budget = args.budget_s if args.budget_s is not None else (420.0 if device == "cuda" else 120.0)

    def write_json(report: dict) -> None:  # after every case: a run cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")

    try:
        report = run(device, args.quick, budget, args.only, progress=write_json)
    except ValueError as error:
        parser.error(str(error))
    write_json(report)
    print_report(report)
    return 0 if any("tokens_per_s" in r for r in report["results"]) else 1
