"""python -m ettin.bench: the model benchmark end to end on a tiny configuration (output, loss check,
JSON fields; no timing assertions), its batch, and the subcommand dispatch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from ettin import bench
from ettin.config import model_config
from ettin.model import IGNORE_INDEX

# 160 tokens > 2 * 64 + 1: the sliding-window layers mask something, so the loss check covers them.
TINY = ["--device", "cpu", "--size", "tiny", "--batch", "3", "--seq-len", "160", "--steps", "1",
        "--warmup", "0", "--trials", "2"]
PEERS = {"mlm": "ModernBertForMaskedLM", "clm": "ModernBertDecoderForCausalLM"}


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_model_bench_prints_the_ratio_and_the_loss_agreement(objective, tmp_path, capsys):
    out_file = tmp_path / "result.json"
    assert bench.main(["model", *TINY, "--objective", objective, "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ratio ours/transformers: \d+\.\d\dx tokens/s$", out, re.M), out
    assert re.search(r"^loss check \(fp32, same weights, same batch\): .* -> agree ", out, re.M), out

    result = json.loads(out_file.read_text())
    assert (result["objective"], result["peer"], result["device"]) == (objective, PEERS[objective], "cpu")
    loss = result["loss"]
    assert loss["agree"] is True
    assert loss["max_difference"] <= loss["tolerance"] == pytest.approx(1e-4 * loss["transformers"])
    assert abs(loss["ours"] - loss["transformers"]) <= loss["tolerance"]
    assert abs(loss["ours_unpadded"] - loss["transformers"]) <= loss["tolerance"]
    assert 9.0 < loss["transformers"] < 12.0  # about ln(vocab) at initialization
    peers = {"transformers", "transformers_sparse"} if objective == "mlm" else {"transformers"}
    assert set(result["sides"]) == {"ours", "ours_unpadded", *peers}
    for side in peers:
        assert abs(loss[side] - loss["transformers"]) <= loss["tolerance"]
    if objective == "mlm":
        assert re.search(r"^ratio ours/transformers \(sparse_prediction=True\): \d+\.\d\dx tokens/s$", out, re.M)
    for side in result["sides"].values():
        assert len(side["all_ms"]) == 2  # trials x steps
        assert side["tokens_per_s"] == pytest.approx(result["real_tokens"] / side["ms_per_step"] * 1e3,
                                                     rel=1e-3)
        assert "peak_step_mib" not in side  # CPU: no memory figures
    ours, peer = result["sides"]["ours"], result["sides"]["transformers"]
    assert result["ratio_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"],
                                                         abs=1e-3)
    assert peer["ratio_tokens_per_s"] == 1.0
    if objective == "clm":  # every real token but each row's last is a target
        assert result["targets"] == result["real_tokens"] - result["batch"]
    assert result["versions"]["transformers"] and result["versions"]["torch"]


def test_a_peer_with_different_weights_is_refused_before_timing(monkeypatch, capsys):
    build_peer = bench.peer_model

    def perturbed_peer(ours, objective, attn, **options):
        peer = build_peer(ours, objective, attn, **options)
        with torch.no_grad():
            peer.decoder.bias.add_(torch.randn_like(peer.decoder.bias))
        return peer

    monkeypatch.setattr(bench, "peer_model", perturbed_peer)
    assert bench.main(["model", *TINY]) == 1
    captured = capsys.readouterr()
    assert "losses disagree" in captured.err
    assert "ratio ours/transformers" not in captured.out


def test_batch_has_the_requested_padding_and_labels():
    config = model_config("tiny")
    batch = bench.make_batch(config, "mlm", batch=32, seq_len=256, padding=0.5, label_rate=0.3)
    real = batch.attention_mask.bool()
    assert batch.input_ids.shape == (32, 256)
    assert int(batch.attention_mask.sum(1).max()) == 256  # the longest row fills the grid
    assert abs(1 - batch.real_tokens / (32 * 256) - 0.5) < 0.05
    assert abs(batch.targets / batch.real_tokens - 0.3) < 0.05
    labelled = batch.labels != IGNORE_INDEX
    assert not (labelled & ~real).any()
    assert (batch.input_ids[labelled] == config.mask_token_id).all()
    assert (batch.input_ids[~real] == config.pad_token_id).all()
    assert torch.equal(batch.peer_labels, batch.labels)

    flat = batch.flat()
    assert flat["input_ids"].shape == (batch.real_tokens,)
    assert flat["cu_seqlens"][-1] == batch.real_tokens and flat["max_seqlen"] == 256
    assert torch.equal(flat["labels"], batch.labels[real])

    full = bench.make_batch(config, "mlm", batch=8, seq_len=128, padding=0.0, label_rate=0.3)
    assert bool(full.attention_mask.all())


def test_clm_batch_labels_are_the_next_real_token():
    config = model_config("tiny")
    batch = bench.make_batch(config, "clm", batch=4, seq_len=64, padding=0.3, label_rate=0.3)
    for row in range(4):
        length = int(batch.attention_mask[row].sum())
        ids, labels = batch.input_ids[row], batch.labels[row]
        assert torch.equal(labels[: length - 1], ids[1:length])
        assert (labels[length - 1 :] == IGNORE_INDEX).all()
        assert torch.equal(batch.peer_labels[row, :length], ids[:length])  # transformers shifts itself
        assert (batch.peer_labels[row, length:] == IGNORE_INDEX).all()


def test_flex_on_cpu_is_a_clear_error(capsys):
    assert bench.main(["model", *TINY, "--attn", "flex"]) == 1
    assert "no backward pass on CPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, problem", [([], "a subcommand is required"),
                                           (["train"], "unknown subcommand 'train'")])
def test_missing_or_unknown_subcommand_lists_the_subcommands(argv, problem, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err
    assert "choose one of: model, data" in err
    assert "usage: python -m ettin.bench {model,data}" in err


def test_module_entry_point_without_subcommand_exits_with_usage():
    done = subprocess.run([sys.executable, "-m", "ettin.bench"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "choose one of: model, data" in done.stderr


def test_data_subcommand_is_the_data_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["data", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m ettin.data.bench" in out and "--repeat" in out
