#!/usr/bin/env bash
# The prepared GPU measurement of issue 12: one call, under 8 minutes, everything written to OUT.
#
#   bash benchmarks/gpu.sh [OUT]        (from the repository root; OUT defaults to $OUT, else bench-out)
#
# Needs only torch (CUDA), transformers and their dependencies (numpy, tokenizers): ettin runs from
# the source tree, not installed, and `python -m ettin.bench gpu` imports no hydra, omegaconf,
# mosaicml-streaming or lightning (tests/test_bench.py checks that). flash-attn and liger-kernel are
# not needed; flash-attn is measured when installed.
#
# OUT/env.txt     date, GPU, driver, versions, commit
# OUT/gpu.json    every figure (rewritten after each case, so a cut-short run keeps what it measured)
# OUT/table.txt   the printed table; OUT/progress.log one line per case as it finishes, and warnings
set -uo pipefail
out="${1:-${OUT:-bench-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=true
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv 2>&1
  python -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
  python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|triton|flash.attn|liger.kernel|tokenizers|numpy) ' || true
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  git status --short 2>/dev/null | head -20
} > "$out/env.txt" 2>&1
# --budget-s: no case starts after 400 s; timeout: a hard stop in case one case runs long.
timeout 470 python -m ettin.bench gpu --budget-s 400 --json "$out/gpu.json" 2> "$out/progress.log" | tee "$out/table.txt"
status=${PIPESTATUS[0]}
tail -n 5 "$out/progress.log"
exit "$status"
