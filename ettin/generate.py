"""``python -m ettin.generate MODEL "prompt"``: text from a bidirectional ModernBERT by iterative
unmasking (the code: ettin/evaluation/generation.py), with ``--compare DECODER`` the decoder's
transformers ``generate`` beside it."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ettin.evaluation.generation import REMASKING


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.generate", description=__doc__)
    parser.add_argument("model", help="a run directory, a checkpoint folder, or a Hugging Face "
                                      "ModernBERT encoder folder or hub id")
    parser.add_argument("prompt")
    parser.add_argument("--steps", type=int, help="forward passes (default: the export's, else --length)")
    parser.add_argument("--length", type=int, help="tokens generated (default: the export's, else 32)")
    parser.add_argument("--block-length", type=int, help="semi-autoregressive blocks (LLaDA); "
                                                          "default: one block")
    parser.add_argument("--remasking", choices=REMASKING)
    parser.add_argument("--temperature", type=float, help="0 (default): argmax proposals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", metavar="DECODER", help="a decoder (run, checkpoint or folder): "
                                                             "its greedy transformers generate, as a baseline")
    args = parser.parse_args(argv)

    from ettin.evaluation.generation import GenerationError, Unmasker, decoder_generate
    from ettin.evaluation.models import EvalError
    from ettin.model.export import ExportError
    from ettin.model.hub import HubError

    try:
        unmasker = Unmasker.load(args.model)
        length = args.length
        steps = args.steps if args.steps is not None else (None if "steps" in unmasker.defaults else length)
        settings = unmasker.settings(length=length, steps=steps, block_length=args.block_length,
                                     remasking=args.remasking, temperature=args.temperature, seed=args.seed)
        text = unmasker.generate(args.prompt, settings)
        baseline = decoder_generate(args.compare, args.prompt, settings.length) if args.compare else None
    except (GenerationError, EvalError, ExportError, HubError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    described = (f"{settings.length} tokens, {settings.steps} steps, blocks of {settings.block}, "
                 f"{settings.remasking} remasking, temperature {settings.temperature:g}, seed {settings.seed}")
    print(f"# {args.model} (unmasking: {described})")
    print(args.prompt + text)
    if baseline is not None:
        print(f"# {args.compare} (decoder, greedy generate, {settings.length} new tokens)")
        print(args.prompt + baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
