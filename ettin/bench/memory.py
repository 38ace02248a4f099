"""python -m ettin.bench memory: peak memory of one training forward + backward of ``ModernBert`` on
CPU, per token, for micro-batches of given row lengths, each in a fresh process (the kernel's
resident-set high-water mark, /proc/self/status VmHWM, above the process's resident set before the
model was built), next to the memory model of ettin/model/memory.py.

    python -m ettin.bench memory --size 150m --objective mlm --rows 1024 4096 8192
    python -m ettin.bench memory --rows 1024,64 4096,64   # two rows of different lengths

Each ``--rows`` item is one micro-batch (comma-separated row lengths). No optimizer: weights and
gradients are in the peak, Adam moments are not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from typing import Optional

GIB, MIB = 2**30, 2**20


def _status_bytes(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _measure(size: str, causal: bool, lengths: list[int], mask_rate: float, result) -> None:
    import torch

    from ettin.model.config import model_config
    from ettin.model.modernbert import ModernBert

    torch.set_num_threads(1)
    start = _status_bytes("VmRSS")
    torch.manual_seed(0)
    model = ModernBert(model_config(size, causal=causal))
    n = sum(lengths)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (n,), generator=generator)
    labels = ids.clone()
    if not causal:
        labels[torch.rand(n, generator=generator) >= mask_rate] = -100
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = model(ids, labels=labels, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    out.loss.backward()
    result.put(dict(peak=_status_bytes("VmHWM") - start, targets=int((labels != -100).sum()),
                    parameters=model.num_parameters()))


def measure(size: str, causal: bool, lengths: list[int], mask_rate: float = 0.3) -> dict:
    """One forward + backward in a fresh process: its peak, targets and the model's parameters."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(size, causal, lengths, mask_rate, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        return dict(peak=None, killed=process.exitcode)
    return queue.get()


def main(argv: Optional[list[str]] = None) -> int:
    from ettin.model.config import model_config
    from ettin.model.memory import training_memory

    parser = argparse.ArgumentParser(prog="python -m ettin.bench memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="150m")
    parser.add_argument("--objective", choices=("mlm", "clm"), default="mlm")
    parser.add_argument("--rows", nargs="+", default=["1024", "4096", "8192"],
                        help="micro-batches, each as comma-separated row lengths")
    args = parser.parse_args(argv)
    causal = args.objective == "clm"
    config = model_config(args.size, causal=causal)
    print(f"{'rows':>14} {'peak GiB':>9} {'MiB/token':>10} {'model GiB':>10} {'model':>6}")
    for item in args.rows:
        lengths = [int(x) for x in item.split(",")]
        got = measure(args.size, causal, lengths)
        if got["peak"] is None:
            print(f"{item:>14} killed (exit code {got['killed']})")
            continue
        model = training_memory(config, lengths, got["targets"], autocast_bf16=False,
                                activation_checkpointing=False, loss_implementation="plain",
                                num_parameters=got["parameters"])
        # No optimizer and weights counted: the first step's backward peak without moments.
        predicted = model.weights + model.activations + model.loss + model.tied_embedding_gradient
        print(f"{item:>14} {got['peak'] / GIB:>9.2f} {got['peak'] / sum(lengths) / MIB:>10.3f} "
              f"{predicted / GIB:>10.2f} {predicted / got['peak'] - 1:>+6.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
