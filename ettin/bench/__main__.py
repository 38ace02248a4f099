"""python -m ettin.bench {model,data,gpu} [options]

    python -m ettin.bench model [--size 17m] [--batch 8] [--seq-len 512] [--objective mlm|clm] ...
    python -m ettin.bench data  [--docs N] ...
    python -m ettin.bench gpu   [--quick] [--json OUT] [--device cpu|cuda] [--budget-s S]
    python -m ettin.bench memory [--size 150m] [--objective mlm|clm] [--rows 1024 4096 8192 1024,64]
"""

from __future__ import annotations

import sys
from typing import Optional

SUBCOMMANDS = {
    "model": "training-step speed and memory of ettin.model.modernbert.ModernBert vs transformers' ModernBERT",
    "data": "data preparation throughput of ettin.data.prepare vs datasets.map(tokenizer)",
    "gpu": "training throughput, MFU and memory of every fast path and transformers, in one bounded run",
    "memory": "peak CPU memory of one training forward + backward per token, measured and modelled",
}
USAGE = "usage: python -m ettin.bench {" + ",".join(SUBCOMMANDS) + "} [options]\n\nsubcommands:\n" + "".join(
    f"  {name:<6} {text}\n" for name, text in SUBCOMMANDS.items())


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        problem = "a subcommand is required" if not argv else f"unknown subcommand {argv[0]!r}"
        print(f"{USAGE}\npython -m ettin.bench: error: {problem}; choose one of: "
              f"{', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    # Imported on demand: the gpu bench must not pay for (or need) the others' imports.
    if argv[0] == "data":
        from ettin.bench.data import main as run
    elif argv[0] == "gpu":
        from ettin.bench.gpu import main as run
    elif argv[0] == "memory":
        from ettin.bench.memory import main as run
    else:
        from ettin.bench.model import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
