"""Data preparation throughput: ``ettin.data.prepare`` against a plain ``datasets.map(tokenizer)``
over the same corpus, in one run, as a ratio.

    python -m ettin.bench data [--repeat 8] [--tokenizer DIR] [--num-proc 0] [--json OUT]

The corpus is the built-in one (ettin/data/corpus.py) repeated ``--repeat`` times, written once as
a .jsonl file that both sides read:

* baseline: ``datasets.load_dataset("json", ...)`` then ``.map(lambda b: tokenizer(b["text"]),
  batched=True)`` -- the usual recipe, no ``num_proc`` (the fast tokenizer is multi-threaded);
* ettin: ``prepare(input=FILE, ...)`` -- reading, tokenizing in processes, chunking, MDS shards,
  lengths, summary.

Each measurement runs in a fresh interpreter, timed after the imports, into an empty cache/output
folder; tokens/s counts the document tokens (the same on both sides: checked). The sides alternate
``--trials`` times and the best time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional


def _corpus_file(directory: Path, repeat: int) -> tuple[Path, int, int]:
    from ettin.data.corpus import builtin_documents

    texts = [text for _, text in builtin_documents()]
    path = directory / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in range(repeat):
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
    return path, len(texts) * repeat, sum(map(len, texts)) * repeat


def _baseline(corpus: Path, tokenizer_dir: str, work: Path) -> tuple[float, int]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = 1 << 30  # no "sequence too long" warnings; nothing is truncated
    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    rows = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(cache))
    tokenized = rows.map(lambda batch: tokenizer(batch["text"]), batched=True,
                         remove_columns=rows.column_names)
    seconds = time.perf_counter() - started
    lengths = tokenized.map(lambda batch: {"n": [len(x) for x in batch["input_ids"]]}, batched=True,
                            remove_columns=tokenized.column_names)
    tokens = int(sum(lengths["n"])) - 2 * len(lengths)  # without the template's [CLS]/[SEP]
    shutil.rmtree(cache, ignore_errors=True)
    return seconds, tokens


def _ettin(corpus: Path, tokenizer_dir: str, work: Path, num_proc: int,
           max_seq_len: int) -> tuple[float, int, dict]:
    from ettin.data.prepare import prepare

    output = work / "prepared"
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    prepare(input=str(corpus), output=str(output), tokenizer=tokenizer_dir, max_seq_len=max_seq_len,
            num_proc=num_proc, progress=False)
    seconds = time.perf_counter() - started
    summary = json.loads((output / "summary.json").read_text())
    tokens = sum(summary["splits"][s]["document_tokens"] for s in ("train", "validation"))
    shutil.rmtree(output, ignore_errors=True)
    return seconds, tokens, summary


def _side(side: str, corpus: Path, tokenizer: str, work: Path, num_proc: int,
          max_seq_len: int) -> dict:
    """One measurement in a fresh interpreter (imports done before the clock starts)."""
    import subprocess

    command = [sys.executable, "-m", "ettin.bench.data", "--side", side, "--corpus", str(corpus),
               "--tokenizer", tokenizer, "--work", str(work), "--num-proc", str(num_proc),
               "--max-seq-len", str(max_seq_len)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{side} benchmark failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_seconds() -> float:
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _measure_side(args) -> dict:
    work = Path(args.work)
    if args.side == "baseline":
        import datasets  # noqa: F401  (imported before the clock starts, as on the other side)
        import transformers  # noqa: F401

        cpu = _cpu_seconds()
        seconds, tokens = _baseline(Path(args.corpus), args.tokenizer, work)
        return {"seconds": seconds, "tokens": tokens, "cpu_seconds": _cpu_seconds() - cpu}
    import streaming  # noqa: F401
    import transformers  # noqa: F401

    cpu = _cpu_seconds()
    seconds, tokens, summary = _ettin(Path(args.corpus), args.tokenizer, work, args.num_proc,
                                      args.max_seq_len)
    return {"seconds": seconds, "tokens": tokens, "num_proc": summary["num_proc"],
            "cpu_seconds": _cpu_seconds() - cpu, "main_process": summary["seconds_in_main_process"]}


def run(repeat: int = 8, tokenizer: Optional[str] = None, num_proc: int = 0, trials: int = 3,
        max_seq_len: int = 1024, vocab_size: int = 8192) -> dict:
    """Both sides ``trials`` times, alternating, each in a fresh process; the best time of each."""
    from ettin.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="ettin-data-bench-"))
    try:
        corpus, documents, chars = _corpus_file(work, repeat)
        if tokenizer is None:
            from ettin.data.corpus import builtin_documents

            tokenizer = str(work / "tokenizer")
            train_tokenizer((t for _, t in builtin_documents()), vocab_size, tokenizer)
        runs: dict = {"baseline": [], "ettin": []}
        for _ in range(trials):
            for side in ("baseline", "ettin"):
                runs[side].append(_side(side, corpus, tokenizer, work, num_proc, max_seq_len))
        base = min(runs["baseline"], key=lambda r: r["seconds"])
        ours = min(runs["ettin"], key=lambda r: r["seconds"])
        if base["tokens"] != ours["tokens"]:
            raise AssertionError(f"the two sides tokenized differently: {base['tokens']} != "
                                 f"{ours['tokens']} tokens")
        return {
            "corpus": {"documents": documents, "characters": chars, "tokens": ours["tokens"],
                       "repeat": repeat, "file": "the built-in corpus as .jsonl"},
            "tokenizer": tokenizer, "cpus": os.cpu_count(), "num_proc": ours["num_proc"],
            "baseline_datasets_map": {"seconds": round(base["seconds"], 3),
                                      "tokens_per_s": round(base["tokens"] / base["seconds"]),
                                      "all_seconds": [round(r["seconds"], 3) for r in runs["baseline"]]},
            "ettin_prepare": {"seconds": round(ours["seconds"], 3),
                              "tokens_per_s": round(ours["tokens"] / ours["seconds"]),
                              "all_seconds": [round(r["seconds"], 3) for r in runs["ettin"]]},
            "ratio": round(base["seconds"] / ours["seconds"], 2),
            "trials": trials,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the built-in corpus")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (default: a BPE trained on the built-in corpus)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--num-proc", type=int, default=0, help="prepare processes (0: one per core)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--side", choices=("baseline", "ettin"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # one measurement, in the subprocess that run() starts
        print(json.dumps(_measure_side(args)))
        return 0
    result = run(repeat=args.repeat, tokenizer=args.tokenizer, num_proc=args.num_proc,
                 trials=args.trials, max_seq_len=args.max_seq_len, vocab_size=args.vocab_size)
    c, b, e = result["corpus"], result["baseline_datasets_map"], result["ettin_prepare"]
    print(f"corpus: {c['documents']:,} documents, {c['characters'] / 1e6:.1f} M characters, "
          f"{c['tokens']:,} tokens; {result['cpus']} CPUs, prepare num_proc={result['num_proc']}")
    print(f"datasets.map(tokenizer): {b['seconds']:.2f} s, {b['tokens_per_s']:,} tokens/s")
    print(f"ettin.data.prepare:      {e['seconds']:.2f} s, {e['tokens_per_s']:,} tokens/s")
    print(f"ratio: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
