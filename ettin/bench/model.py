"""python -m ettin.bench model: one training step (forward + backward, no optimizer) of
``ettin.model.modernbert.ModernBert`` against transformers' own model with the same weights on the
same padded batch: ``ModernBertForMaskedLM`` (mlm, ``sparse_prediction=True`` so its head also runs on
labelled rows only) or ``ModernBertDecoderForCausalLM`` (clm, Wqkv split into q/k/v). Ours is timed
twice: fed the padded batch (it unpads inside) and fed the flat unpadded stream with ``cu_seqlens``.
Before any timing the three losses on the batch are compared in fp32; the run stops if they disagree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ettin.model.config import SIZES, ModelConfig, model_config
from ettin.bench.peer import check_losses, device_name, loss_of, peer_model
from ettin.model.modernbert import IGNORE_INDEX, ModernBert, unpad

# Defaults per device: CPU small enough for a laptop, GPU a realistic pretraining micro-batch.
DEVICE_DEFAULTS = {
    "cpu": dict(size="17m", batch=8, seq_len=512, steps=3, warmup=1, trials=3, dtype="fp32"),
    "cuda": dict(size="150m", batch=16, seq_len=1024, steps=10, warmup=3, trials=5, dtype="bf16"),
}
OUR_SIDES = ("ours", "ours_unpadded")
SIDE_NAMES = {"ours": "ours (padded batch)", "ours_unpadded": "ours (unpadded, cu_seqlens)"}


# ------------------------------------------------------------------------------------------------
# The batch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], pad id after each row's end
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], ours: the target of each position (clm: pre-shifted)
    peer_labels: torch.Tensor  # [B, T], what transformers takes (clm: input_ids, it shifts itself)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def flat(self) -> dict:
        """Our unpadded inputs: the real tokens as one stream, ``cu_seqlens`` marking the rows."""
        input_ids, labels, cu_seqlens, max_seqlen, _ = unpad(self.input_ids, self.attention_mask,
                                                             self.labels)
        return dict(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def to(self, device: str) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                              self.peer_labels)))


def row_lengths(batch: int, seq_len: int, padding: float, generator: torch.Generator) -> torch.Tensor:
    """Random row lengths whose padding averages ``padding * seq_len``; the first row fills the grid."""
    if not 0.0 <= padding < 1.0:
        raise ValueError(f"--padding must be in [0, 1), not {padding}")
    shares = torch.rand(batch, generator=generator)
    shares[0] = 0.0
    if shares.sum() > 0:  # one row alone cannot be padded
        shares *= padding * seq_len * batch / shares.sum()
    return (seq_len - shares.round().long()).clamp(2, seq_len)


def make_batch(config: ModelConfig, objective: str, batch: int, seq_len: int, padding: float,
               label_rate: float, seed: int = 0) -> Batch:
    """Right-padded random rows. mlm: ``label_rate`` of the real tokens are targets, replaced by
    [MASK] in the input. clm: every real token but a row's first is the target of the one before."""
    generator = torch.Generator().manual_seed(seed)
    lengths = row_lengths(batch, seq_len, padding, generator)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    specials = {config.pad_token_id, config.mask_token_id, config.bos_token_id, config.eos_token_id}
    vocab = min(specials | {config.vocab_size})  # ordinary tokens lie below the special ids
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    tokens[:, 0] = config.bos_token_id
    if objective == "mlm":
        picked = (torch.rand(batch, seq_len, generator=generator) < label_rate) & mask
        labels = torch.where(picked, tokens, IGNORE_INDEX)
        input_ids = torch.where(picked, config.mask_token_id, tokens)
        peer_labels = labels
    else:
        input_ids = tokens
        labels = F.pad(torch.where(mask, tokens, IGNORE_INDEX)[:, 1:], (0, 1), value=IGNORE_INDEX)
        peer_labels = torch.where(mask, tokens, IGNORE_INDEX)
    input_ids = torch.where(mask, input_ids, config.pad_token_id)
    return Batch(input_ids, mask.long(), labels, peer_labels)


# ------------------------------------------------------------------------------------------------
# Measuring


def side_inputs(batch: Batch, objective: str) -> dict[str, dict]:
    padded = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    peer = dict(padded, labels=batch.peer_labels)
    if objective == "clm":
        peer["use_cache"] = False  # training: no KV cache
    return {"ours": dict(padded, labels=batch.labels), "ours_unpadded": batch.flat(),
            "transformers": peer, "transformers_sparse": peer}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def training_step(model: nn.Module, inputs: dict, autocast) -> None:
    with autocast:
        loss = model(**inputs).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def time_steps(model: nn.Module, inputs: dict, steps: int, device: str, autocast) -> tuple[list, int]:
    """Seconds of each of ``steps`` training steps, and (CUDA) the peak memory they allocated above
    what was allocated before them (activations, gradients, workspaces) in bytes."""
    sync(device)
    if device == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        training_step(model, inputs, autocast)
        sync(device)
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else 0
    return seconds, peak


def bench_model(size: str, batch: int, seq_len: int, padding: float, label_rate: float, steps: int,
                warmup: int, trials: int, device: str, dtype: str, objective: str, attn: str,
                seed: int = 0) -> dict:
    """The sides (ours padded, ours unpadded, transformers as configured by default and, for mlm,
    with sparse_prediction=True) on one batch: the fp32 loss check, then ``trials`` rounds of
    ``steps`` timed steps each, the sides alternating (the order rotates each round); medians over
    all timed steps."""
    if attn == "flex" and device == "cpu":
        raise ValueError("--attn flex has no backward pass on CPU (torch FlexAttention); use sdpa or eager")
    torch.manual_seed(seed)
    ours = ModernBert(model_config(size, attn_implementation=attn, attention_output_dropout=0.0,
                                   causal=objective == "clm"))
    peers = {"transformers": peer_model(ours, objective, attn)}
    if objective == "mlm":
        peers["transformers_sparse"] = peer_model(ours, objective, attn, sparse_prediction=True)
    models = {"ours": ours, "ours_unpadded": ours, **peers}
    sides_run = (*OUR_SIDES, *peers)
    for model in models.values():
        model.to(device).train()  # every dropout is 0: train mode is deterministic
    peer = peers["transformers"]
    data = make_batch(ours.config, objective, batch, seq_len, padding, label_rate, seed)
    inputs = side_inputs(data.to(device), objective)

    losses = {side: loss_of(models[side], inputs[side]) for side in sides_run}
    difference, tolerance = check_losses(losses)

    autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())
    for side in sides_run:
        time_steps(models[side], inputs[side], warmup, device, autocast)
    seconds: dict[str, list] = {side: [] for side in sides_run}
    peaks = {side: 0 for side in sides_run}
    for trial in range(trials):
        first = trial % len(sides_run)
        for side in sides_run[first:] + sides_run[:first]:
            step_seconds, peak = time_steps(models[side], inputs[side], steps, device, autocast)
            seconds[side] += step_seconds
            peaks[side] = max(peaks[side], peak)

    tokens = data.real_tokens
    sides = {}
    for side in sides_run:
        median = statistics.median(seconds[side])
        sides[side] = {"ms_per_step": round(median * 1e3, 2), "tokens_per_s": round(tokens / median),
                       "all_ms": [round(s * 1e3, 2) for s in seconds[side]]}
        if device == "cuda":
            sides[side]["peak_step_mib"] = round(peaks[side] / 2**20, 1)
    peer_rate = sides["transformers"]["tokens_per_s"]
    for side in sides_run:
        sides[side]["ratio_tokens_per_s"] = round(sides[side]["tokens_per_s"] / peer_rate, 3)
        if device == "cuda":
            sides[side]["ratio_peak_memory"] = round(peaks[side] / peaks["transformers"], 3)

    import transformers

    return {
        "benchmark": "model", "size": size, "objective": objective, "attn": attn,
        "peer": type(peer).__name__, "peer_attn": peer.config._attn_implementation,
        "device": device, "device_name": device_name(device), "dtype": dtype,
        "batch": batch, "seq_len": seq_len, "real_tokens": tokens, "targets": data.targets,
        "padding": round(1 - tokens / (batch * seq_len), 3),
        "label_rate": label_rate if objective == "mlm" else None,
        "steps": steps, "warmup": warmup, "trials": trials, "parameters": ours.num_parameters(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "loss": {**{side: round(value, 6) for side, value in losses.items()},
                 "max_difference": difference, "tolerance": tolerance, "agree": True},
        "sides": sides,
        "ratio_tokens_per_s": sides["ours"]["ratio_tokens_per_s"],
        "ratio_tokens_per_s_vs_sparse": (round(sides["ours"]["tokens_per_s"]
                                               / sides["transformers_sparse"]["tokens_per_s"], 3)
                                         if "transformers_sparse" in sides else None),
    }


def print_model_result(r: dict) -> None:
    cuda = r["device"] == "cuda"
    print(f"{r['size']} {r['objective']} ({r['parameters']:,} parameters), attention {r['attn']} "
          f"(transformers: {r['peer_attn']}), {r['device_name']} {r['dtype']}")
    print(f"batch {r['batch']} x {r['seq_len']}: {r['real_tokens']:,} real tokens "
          f"({r['padding']:.0%} padding), {r['targets']:,} targets; {r['trials']} trials x "
          f"{r['steps']} steps per side after {r['warmup']} warm-up; forward + backward, no optimizer")
    loss = r["loss"]
    values = " | ".join(f"{side.replace('_', ' ')} {loss[side]:.6f}" for side in r["sides"])
    print(f"loss check (fp32, same weights, same batch): {values} -> agree "
          f"(max difference {loss['max_difference']:.2g} <= {loss['tolerance']:.2g})")
    header = f"{'side':<56}{'ms/step':>10}{'tokens/s':>12}{'vs peer':>9}"
    print(header + (f"{'peak MiB':>10}{'vs peer':>9}" if cuda else ""))
    names = {**SIDE_NAMES, "transformers": f"transformers {r['peer']}",
             "transformers_sparse": f"transformers {r['peer']}, sparse_prediction"}
    for side, s in r["sides"].items():
        name = names[side]
        line = f"{name:<56}{s['ms_per_step']:>10.1f}{s['tokens_per_s']:>12,}{s['ratio_tokens_per_s']:>8.2f}x"
        if cuda:
            line += f"{s['peak_step_mib']:>10,.0f}{s['ratio_peak_memory']:>8.2f}x"
        print(line)
    print(f"ratio ours/transformers: {r['ratio_tokens_per_s']:.2f}x tokens/s")
    if r["ratio_tokens_per_s_vs_sparse"] is not None:
        print(f"ratio ours/transformers (sparse_prediction=True): {r['ratio_tokens_per_s_vs_sparse']:.2f}x tokens/s")


def model_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ettin.bench model",
        description="One training step of ettin.model.modernbert.ModernBert vs transformers' ModernBERT (same "
                    "weights, same batch). Defaults depend on the device: "
                    + "; ".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in values.items())
                                for d, values in DEVICE_DEFAULTS.items()))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--size", choices=tuple(SIZES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--padding", type=float, default=0.5, help="share of the padded grid that is padding")
    parser.add_argument("--label-rate", type=float, default=0.3, help="mlm: share of real tokens labelled")
    parser.add_argument("--steps", type=int, help="timed steps per side per trial")
    parser.add_argument("--warmup", type=int, help="untimed steps per side first")
    parser.add_argument("--trials", type=int, help="rounds alternating the sides")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="bf16: autocast, fp32 weights")
    parser.add_argument("--objective", choices=("mlm", "clm"), default="mlm")
    parser.add_argument("--attn", choices=("sdpa", "flex", "eager"), default="sdpa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    settings = {k: v if getattr(args, k) is None else getattr(args, k)
                for k, v in DEVICE_DEFAULTS[device].items()}
    if min(settings["steps"], settings["trials"], settings["batch"], settings["seq_len"]) < 1:
        parser.error("--steps, --trials, --batch and --seq-len must be at least 1")
    try:
        result = bench_model(padding=args.padding, label_rate=args.label_rate, device=device,
                             objective=args.objective, attn=args.attn, seed=args.seed, **settings)
    except (ValueError, RuntimeError) as error:
        print(f"python -m ettin.bench model: {error}", file=sys.stderr)
        return 1
    print_model_result(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return model_main(sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
