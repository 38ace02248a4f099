"""python -m ettin.bench: the model benchmark end to end on a tiny configuration (output, loss check,
JSON fields; no timing assertions), its batch, and the subcommand dispatch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from ettin.bench import __main__ as bench_cli
from ettin.bench import model as bench
from ettin.model.config import model_config
from ettin.model.modernbert import IGNORE_INDEX

# 160 tokens > 2 * 64 + 1: the sliding-window layers mask something, so the loss check covers them.
TINY = ["--device", "cpu", "--size", "tiny", "--batch", "3", "--seq-len", "160", "--steps", "1",
        "--warmup", "0", "--trials", "2"]
PEERS = {"mlm": "ModernBertForMaskedLM", "clm": "ModernBertDecoderForCausalLM"}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_model_bench_prints_the_ratio_and_the_loss_agreement(objective, tmp_path, capsys):
    out_file = tmp_path / "result.json"
    assert bench_cli.main(["model", *TINY, "--objective", objective, "--json", str(out_file)]) == 0
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
        assert_rounded_rate(side["tokens_per_s"], result["real_tokens"], side["ms_per_step"])
        assert "peak_step_mib" not in side  # CPU: no memory figures
    ours, peer = result["sides"]["ours"], result["sides"]["transformers"]
    assert result["ratio_tokens_per_s"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"],
                                                         abs=1e-3)
    assert peer["ratio_tokens_per_s"] == 1.0
    if objective == "clm":  # every real token but each row's last is a target
        assert result["targets"] == result["real_tokens"] - result["batch"]
    assert result["versions"]["transformers"] and result["versions"]["torch"]


def assert_rounded_rate(tokens_per_s: int, tokens: int, ms: float) -> None:
    """tokens_per_s = round(tokens / median), ms = round(median * 1e3, 2): whatever the machine's
    speed, tokens_per_s lies within what the rounding of ms to 0.005 ms leaves open."""
    fastest, slowest = tokens / (max(ms - 0.005, 1e-9) / 1e3), tokens / ((ms + 0.005) / 1e3)
    assert slowest - 0.5 <= tokens_per_s <= fastest + 0.5, (tokens_per_s, tokens, ms)


def test_rounded_rate_check_holds_for_fast_and_slow_steps():
    for seconds in (0.000123456, 0.0123456, 1.23456, 123.456):  # a fast machine to a slow one
        assert_rounded_rate(round(4321 / seconds), 4321, round(seconds * 1e3, 2))
    with pytest.raises(AssertionError):
        assert_rounded_rate(round(4321 / 1.23456 * 1.01), 4321, round(1.23456 * 1e3, 2))


@pytest.mark.slow
def test_a_peer_with_different_weights_is_refused_before_timing(monkeypatch, capsys):
    build_peer = bench.peer_model

    def perturbed_peer(ours, objective, attn, **options):
        peer = build_peer(ours, objective, attn, **options)
        with torch.no_grad():
            peer.decoder.bias.add_(torch.randn_like(peer.decoder.bias))
        return peer

    monkeypatch.setattr(bench, "peer_model", perturbed_peer)
    assert bench_cli.main(["model", *TINY]) == 1
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
    assert bench_cli.main(["model", *TINY, "--attn", "flex"]) == 1
    assert "no backward pass on CPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv, problem", [([], "a subcommand is required"),
                                           (["train"], "unknown subcommand 'train'")])
def test_missing_or_unknown_subcommand_lists_the_subcommands(argv, problem, capsys):
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err
    assert "choose one of: model, data, gpu" in err
    assert "usage: python -m ettin.bench {model,data,gpu,memory}" in err


def test_module_entry_point_without_subcommand_exits_with_usage():
    done = subprocess.run([sys.executable, "-m", "ettin.bench"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "choose one of: model, data, gpu" in done.stderr


def test_data_subcommand_is_the_data_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["data", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m ettin.bench data" in out and "--repeat" in out


# ------------------------------------------------------------------------------------------------
# python -m ettin.bench gpu, on CPU


@pytest.fixture
def small_corpus(monkeypatch):
    """A few hundred generated documents instead of parsing the standard library (the logic is the
    same, and the test stays in seconds); some are longer than the 512-token shape."""
    from ettin.bench import gpu as bench_gpu

    generator = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(300)]
    lengths = torch.randint(5, 200, (400,), generator=generator).tolist() + [900, 1500]
    documents = [(f"doc{i}", " ".join(words[j] for j in torch.randint(0, 300, (n,), generator=generator).tolist()))
                 for i, n in enumerate(lengths)]
    monkeypatch.setattr(bench_gpu, "builtin_documents", lambda max_chars=None: iter(documents))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # recorded in device_name only
    return documents


@pytest.mark.slow
def test_gpu_bench_quick_on_cpu_measures_every_planned_case(small_corpus, tmp_path, capsys):
    from ettin.bench import gpu as bench_gpu

    out_file = tmp_path / "gpu.json"
    assert bench_cli.main(["gpu", "--device", "cpu", "--quick", "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_file.read_text())
    planned = bench_gpu.plan("cpu", True, ["sdpa"])
    results = {r["case"]: r for r in report["results"]}
    assert list(results) == [c.name for c in planned]  # everything ran, in priority order
    assert not [r for r in results.values() if "error" in r]
    assert {s["case"] for s in report["skipped"]} == {"attention flex", "attention flash"}
    assert {r["shape"] for r in results.values()} == {"tiny@128", "17m@128", "tiny@512"}
    assert {(r["objective"], r["packing"]) for r in results.values()} == {
        ("mlm", "rows"), ("mlm", "packed"), ("clm", "rows"), ("clm", "packed")}
    assert {r["loss"] for r in results.values()} == {"chunked", "plain"}

    for r in results.values():
        rounds = r["timed_steps"] // r["micro_batches"]
        assert r["timed_steps"] == rounds * r["micro_batches"] >= r["micro_batches"]  # whole rounds
        assert r["timed_tokens"] == pytest.approx(rounds * r["micro_batches"] * r["tokens_per_micro_batch"], rel=0.01)
        assert r["tokens_per_s"] == pytest.approx(r["timed_tokens"] / r["timed_s"], rel=1e-3, abs=0.5)  # rounding
        assert r["mfu"] is None and r["ratio_vs_ettin"] is None and r["peak_memory_gib"] is None  # CPU
        assert r["graph_breaks"] == 0
        if r["side"] == "ours" and not r["compile"]:
            assert r["host_syncs_per_step"] == 0, r["case"]
        if r["compile"]:  # first, global and sliding layers; static, then dynamic shapes
            assert r["warmup_s"] > 0 and r["compiled_graphs"] >= 3
        else:
            assert r["compiled_graphs"] == 0
    # The peers ran after an fp32 loss check on the same weights and batch.
    peers = [r for r in results.values() if r["side"] != "ours"]
    assert {r["side"] for r in peers} == {"transformers", "transformers_sparse"}
    for r in peers:
        check = r["loss_check"]
        assert abs(check["ours"] - check["transformers"]) <= check["tolerance"] == pytest.approx(1e-4 * check["transformers"])
    sparse = results["tiny@128 mlm rows   transformers sparse_pred"]
    assert sparse["host_syncs_per_step"] > 0  # its boolean indexing: the counter sees syncs
    # Ratios: to the fastest transformers side of the same shape and objective.
    ours = results["tiny@128 mlm packed ours sdpa compiled"]
    fastest = max(r["tokens_per_s"] for r in peers if r["objective"] == "mlm")
    assert ours["ratio_vs_transformers"] == pytest.approx(ours["tokens_per_s"] / fastest, abs=1e-3)
    assert results["17m@128 mlm packed ours sdpa"]["ratio_vs_transformers"] is None  # no peer measured
    # The packed micro-batch holds up to rows x seq_len tokens.
    assert ours["tokens_per_micro_batch"] <= 4 * 128

    assert re.search(r"^case +tok/µb +tokens/s +MFU +peak GiB +vs HF +vs Ettin +warm-up +syncs +breaks$", out, re.M)
    assert re.search(r"^tiny@128 mlm packed ours sdpa compiled +[\d,]+ +[\d,]+ +- +- +\d+\.\d\d +- +\d+\.\ds +- +0$",
                     out, re.M), out
    assert "loss check tiny@128 clm rows   transformers: ours " in out
    assert "skipped: attention flex: torch FlexAttention has no backward pass on CPU" in out


def test_gpu_bench_skips_what_does_not_fit_the_budget_and_says_so(small_corpus, tmp_path, capsys):
    from ettin.bench import gpu as bench_gpu

    out_file = tmp_path / "gpu.json"
    assert bench_cli.main(["gpu", "--device", "cpu", "--quick", "--budget-s", "0", "--json", str(out_file)]) == 1
    report = json.loads(out_file.read_text())
    assert report["results"] == []
    budget = [s for s in report["skipped"] if s["reason"].startswith("time budget: needs ~")]
    assert [s["case"] for s in budget] == [c.name for c in bench_gpu.plan("cpu", True, ["sdpa"])]
    assert "skipped: tiny@128 mlm rows   ours sdpa: time budget" in capsys.readouterr().out


@pytest.mark.slow
def test_gpu_bench_only_runs_the_matching_cases(small_corpus, tmp_path, capsys, monkeypatch):
    """...and times our side through training's own TrainStep."""
    from ettin.bench import gpu as bench_gpu
    from ettin.train.step import TrainStep

    steps = []

    class CountedStep(TrainStep):
        def __call__(self, *args, **kwargs):
            steps.append(1)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(bench_gpu, "TrainStep", CountedStep)
    out_file = tmp_path / "gpu.json"
    assert bench_cli.main(["gpu", "--device", "cpu", "--quick", "--only", r"tiny@128 clm (rows|packed) +ours sdpa$",
                       "--json", str(out_file)]) == 0
    report = json.loads(out_file.read_text())
    assert [r["case"] for r in report["results"]] == ["tiny@128 clm rows   ours sdpa", "tiny@128 clm packed ours sdpa"]
    assert len(steps) > sum(r["timed_steps"] for r in report["results"])  # timed, plus warm-up and sync count
    with pytest.raises(SystemExit):
        bench_cli.main(["gpu", "--device", "cpu", "--only", "no such case"])
    assert "--only 'no such case' matches no case" in capsys.readouterr().err


def test_packed_micro_batches_hold_whole_rows_up_to_the_budget():
    from ettin.bench.gpu import Shape, micro_batch_rows

    rows = [(i, torch.ones(n, dtype=torch.long).numpy()) for i, n in enumerate([100, 30, 128, 5, 60, 90, 128, 7] * 4)]
    shape = Shape("tiny", 128, 2)
    packed = micro_batch_rows(rows, shape, "packed", 3)
    assert len(packed) == 3
    assert all(sum(len(t) for _, t in group) <= 256 for group in packed)
    assert [i for group in packed for i, _ in group] == list(range(sum(len(g) for g in packed)))  # in order, whole
    assert sum(len(t) for _, t in packed[0]) + len(rows[len(packed[0])][1]) > 256  # full before the next
    assert [len(g) for g in micro_batch_rows(rows, shape, "rows", 3)] == [2, 2, 2]


@pytest.mark.slow
def test_the_bench_imports_nothing_the_gpu_machine_lacks():
    """The GPU machine has torch, transformers and their dependencies only."""
    code = ("import sys, ettin.bench.model, ettin.bench.gpu; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'hydra', 'omegaconf', 'streaming', 'lightning', 'lightning_fabric', 'pytorch_lightning', 'datasets'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
