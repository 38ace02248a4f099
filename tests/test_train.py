"""The training entrypoint end to end on CPU: the offline default, exact resume, phase transitions,
cross-objective training and starting from other formats."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from ettin.store.checkpoints import latest_checkpoint, list_checkpoints, read_meta
from ettin.train.module import EttinModule
from ettin.train.config import compose
from ettin.train_command import main
from ettin.train.run import train

# Short settings shared by the tests: the smoke recipe with smaller phases.
SHORT = [
    "phases.pretrain.tokens=60_000", "phases.pretrain.checkpoint_every_tokens=20_000",
    "phases.extension.tokens=20_000", "phases.decay.tokens=10_000",
    "trainer.log_every_steps=1", "trainer.num_workers=0",
]


def losses(run_dir: Path, phase: str) -> list[tuple[float, float]]:
    """(tokens, train loss) per logged step of one phase, in order."""
    path = run_dir / "logs" / phase / "metrics.csv"
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [(float(r["train/tokens"]), float(r["train/loss"])) for r in rows]


def logged_steps(run_dir: Path, phase: str = "pretrain") -> list[int]:
    with (run_dir / "logs" / phase / "metrics.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A data dir with the built-in tokenizer and corpus prepared once for every test."""
    root = tmp_path_factory.mktemp("ettin")
    return root


def run_args(workspace: Path, name: str, *extra: str) -> list[str]:
    return [f"output_dir={workspace / 'runs'}", f"data_dir={workspace / 'data'}",
            f"run_name={name}", *SHORT, *extra]


# Runs that several tests start from, made once per session by whichever test needs one first.

@pytest.fixture(scope="session")
def pair_run(workspace) -> str:
    """The default command (a pair, evaluated, with its report) on short phases; its printed output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(run_args(workspace, "pair", "eval_limit=8")) == 0
    return out.getvalue()


def trained(workspace: Path, name: str, *extra: str):
    """The config of a smoke run (one model) with the SHORT settings and ``extra``, after training it."""
    cfg = compose("smoke", run_args(workspace, name, "pair=false", *extra))
    train(cfg)
    return cfg


@pytest.fixture(scope="session")
def phases_run(workspace):
    return trained(workspace, "phases", "objective=clm", "export_at_phase_end=true")


@pytest.fixture(scope="session")
def straight_run(workspace):
    return trained(workspace, "straight", "phase_order=[pretrain]", "objective=mlm")


@pytest.mark.slow
def test_default_run_trains_and_exports_a_pair(workspace, pair_run):
    out = pair_run
    from transformers import pipeline

    for side, task in (("encoder", "fill-mask"), ("decoder", "text-generation")):
        run_dir = workspace / "runs" / f"pair-{side}"
        history = losses(run_dir, "pretrain")
        first = sum(l for _, l in history[:5]) / 5
        last = sum(l for _, l in history[-5:]) / 5
        assert last < first - 0.5, (side, first, last)  # clearly falling
        assert str(run_dir / "hf") in out
        pipe = pipeline(task, model=str(run_dir / "hf"))
        if task == "fill-mask":
            assert len(pipe(f"The {pipe.tokenizer.mask_token} module.")) > 0
        else:
            assert pipe("The module", max_new_tokens=5)[0]["generated_text"].startswith("The module")
        metas = [read_meta(c) for c in list_checkpoints(run_dir)]
        assert [m["phase"] for m in metas if m["phase_end"]] == ["pretrain", "extension", "decay"]
    report = workspace / "runs" / "pair-report" / "report.md"
    assert f"pair report: {report}" in out and report.is_file()
    results = json.loads((report.parent / "eval.json").read_text())
    assert set(results["models"]) == {"pair-encoder", "pair-decoder"}
    # Both models' per-example files reach the report: every difference gets a paired test.
    rows = [line for line in report.read_text().splitlines() if line.startswith("| smoke_")]
    assert rows and all("unpaired" not in row for row in rows)
    assert any("McNemar exact" in row for row in rows)


@pytest.mark.slow
def test_resume_after_a_crash_repeats_the_same_losses_bitwise(workspace, crash_at_tokens, straight_run):
    args = ["phase_order=[pretrain]", "objective=mlm", "pair=false"]
    reference = straight_run
    expected = losses(reference.run_dir, "pretrain")

    crashing = compose("smoke", run_args(workspace, "crashing", *args))
    crash_at_tokens(crashing, 30_000)
    resumed_from = read_meta(latest_checkpoint(crashing.run_dir))
    assert 0 < resumed_from["tokens"] < 60_000 and not resumed_from["phase_end"]
    train(crashing)  # resume=auto
    # The whole history, in one metrics.csv: rows up to the checkpoint kept, the rest redone alike.
    assert losses(crashing.run_dir, "pretrain") == expected
    assert len([t for t, _ in expected if t > resumed_from["tokens"]]) >= 3
    assert logged_steps(crashing.run_dir) == logged_steps(reference.run_dir)  # steps continue


@pytest.mark.slow
def test_phase_transition_keeps_weights_and_resets_the_clock(phases_run):
    cfg = phases_run
    ends = {read_meta(c)["phase"]: c for c in list_checkpoints(cfg.run_dir) if read_meta(c)["phase_end"]}
    assert set(ends) == {"pretrain", "extension", "decay"}
    for phase in ends:  # each phase's model, exported and checked against transformers
        exported = json.loads((cfg.run_dir / f"hf-{phase}" / "config.json").read_text())
        assert exported["global_rope_theta"] == read_meta(ends[phase])["model_config"]["global_rope_theta"]
    ext = read_meta(ends["extension"])
    assert ext["tokens"] >= 20_000 and ext["tokens"] < 60_000  # clock restarted at the phase
    assert ext["model_config"]["global_rope_theta"] == 160_000
    # Running the same command again re-applies nothing: the run is finished.
    before = sorted(p.name for p in list_checkpoints(cfg.run_dir))
    train(cfg)
    assert sorted(p.name for p in list_checkpoints(cfg.run_dir)) == before


@pytest.mark.slow
def test_single_phase_from_another_runs_checkpoint(workspace, phases_run):
    source = phases_run.run_dir
    cfg = trained(workspace, "ext-only", "objective=clm", "phase=extension", f"init={source}")
    assert read_meta(latest_checkpoint(cfg.run_dir))["phase"] == "extension"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, init_run, objective", [
    ("encoder_from_decoder_150m", "phases", "mntp"),
    ("decoder_from_encoder_150m", "straight", "clm"),
])
def test_cross_objective_training_runs_both_directions(workspace, request, recipe, init_run, objective):
    init = request.getfixturevalue(f"{init_run}_run").run_dir
    cfg = compose(recipe, [
        "size=tiny", "tokenizer=builtin", "global_batch=16", f"data_dir={workspace / 'data'}",
        f"output_dir={workspace / 'runs'}", f"init={init}", "data.cross=[{path: builtin}]",
        "phases.cross.tokens=8_000", "phases.cross.seq_len=256", "phases.cross.warmup_tokens=2_000",
        "phases.cross.decay_tokens=4_000", "phases.cross.batch_warmup_tokens=0",
        "trainer.num_workers=0", "trainer.log_every_steps=1",
    ])
    assert cfg.objective == objective
    final = train(cfg)
    meta = read_meta(final)
    assert meta["objective"] == objective and meta["phase_end"]
    assert meta["model_config"]["causal"] == (objective == "clm")


@pytest.mark.slow
def test_training_starts_from_a_hugging_face_folder(workspace, pair_run):
    """init=<folder transformers loads>: the exported decoder of the default run continues training,
    with a fresh optimizer that warms up (the phase has no warmup of its own) and decays weights
    relative to the recipe's peak LR."""
    exported = workspace / "runs" / "pair-decoder" / "hf"
    cfg = trained(workspace, "from-hf", "objective=clm", "phase=decay", f"init={exported}")
    assert read_meta(latest_checkpoint(cfg.run_dir))["phase_end"]
    assert "initialised from Hugging Face model" in (cfg.run_dir / "train.log").read_text()
    scratch = losses(workspace / "runs" / "pair-decoder", "pretrain")[0][1]
    assert losses(cfg.run_dir, "decay")[0][1] < scratch - 1.0  # it starts from the trained weights
    with (cfg.run_dir / "logs" / "decay" / "metrics.csv").open() as f:
        lrs = [float(r["train/lr"]) for r in csv.DictReader(f) if r["train/lr"]]
    peak = cfg.optim.lr * cfg.phases["decay"].lr_scale
    assert lrs[0] < 1e-6 * peak and max(lrs) > 0.5 * peak  # ramps up from ~0, then the schedule


@pytest.mark.slow
def test_packed_micro_batches_train_as_rows_do(workspace, monkeypatch):
    """pack_micro_batches=true: a micro-batch takes whole chunks up to micro_batch x seq_len tokens,
    so short documents give it more rows than micro_batch (off: micro_batch rows). Under tokens loss
    normalisation the step's gradient does not depend on the grouping: the same losses (dropout
    off; only the order of floating-point sums differs)."""
    runs = {}
    for pack in (False, True):
        rows = []
        original = EttinModule.training_step

        def record(self, batch, batch_idx, original=original, rows=rows):
            rows.extend(len(mb["cu_seqlens"]) - 1 for mb in batch.micro_batches)
            return original(self, batch, batch_idx)

        monkeypatch.setattr(EttinModule, "training_step", record)
        cfg = trained(workspace, f"pack-{pack}", "objective=clm", "phase_order=[pretrain]",
                      "phases.pretrain.tokens=20_000", "trainer.log_every_steps=1",
                      "model.attention_output_dropout=0.0", "phases.pretrain.micro_batch=2",
                      f"pack_micro_batches={pack}")
        monkeypatch.undo()
        micro_batch = cfg.phases["pretrain"].micro_batch
        assert read_meta(latest_checkpoint(cfg.run_dir))["tokens"] >= 20_000
        assert (max(rows) > micro_batch) == pack and max(rows) >= micro_batch
        runs[pack] = losses(cfg.run_dir, "pretrain")
        assert ("packed micro-batches of up to" in (cfg.run_dir / "train.log").read_text()) == pack
    assert [t for t, _ in runs[True]] == [t for t, _ in runs[False]] and len(runs[True]) >= 10
    assert max(abs(a - b) for (_, a), (_, b) in zip(runs[True], runs[False])) <= 1e-4


@pytest.mark.slow
def test_only_log_steps_read_values_back_from_the_device(workspace, monkeypatch):
    """The whole loop as Lightning runs it, from one step's start to the next one's: the training step,
    the callbacks, the progress bar and Lightning's own bookkeeping. Between log steps nothing reads a
    value back from the device (``ettin.bench.gpu.HostSyncs``; on CPU the stand-in for CUDA's sync
    debug mode). The loader collates in a worker process; ``count_on_host`` counts on the batch
    before it is copied to the device, so its reads are of host memory."""
    import traceback

    import lightning as L

    import ettin.train.phase as ettin_phase
    from ettin.bench.gpu import HostSyncs

    def on_host():
        return any(f.name == "count_on_host" for f in traceback.extract_stack())

    class HostSyncsOnDevice(HostSyncs):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if on_host():
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    found: dict[int, list] = {}
    # Reads that dispatch no aten op on CPU (tolist, numpy) or that are no-ops there (cpu), counted
    # as they are called.
    for name in ("tolist", "numpy", "cpu", "item", "__float__", "__int__", "__bool__"):
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            if Record.mode is not None and not on_host():
                Record.mode.found.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    class Record(L.Callback):
        mode = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.stop()
            self.step = module.loader_state.step + 1
            Record.mode = HostSyncsOnDevice().__enter__()

        def on_train_end(self, trainer, module):  # the last step: the phase end follows
            self.stop()

        def stop(self):
            if Record.mode is not None:
                Record.mode.__exit__(None, None, None)
                found[self.step] = Record.mode.found
                Record.mode = None

    build_trainer = ettin_phase.build_trainer
    monkeypatch.setattr(ettin_phase, "build_trainer", lambda cfg, callbacks, loggers: build_trainer(
        cfg, callbacks=[Record(), *callbacks], loggers=loggers))
    trained(workspace, "host-syncs", "phase_order=[pretrain]", "phases.pretrain.tokens=30_000",
            "trainer.log_every_steps=4", "trainer.num_workers=1", "phases.pretrain.val_every_tokens=0",
            "phases.pretrain.checkpoint_every_tokens=0")
    monkeypatch.undo()
    assert len(found) >= 16
    for step, syncs in found.items():
        if step % 4:
            assert syncs == [], (step, syncs)
        else:  # the detector sees the log steps' reads
            assert "_local_scalar_dense" in syncs, step


@pytest.mark.slow
def test_data_prepared_with_another_tokenizer_is_refused(workspace, straight_run, capsys):
    prepared = sorted((workspace / "data").glob("builtin-*"))
    other = workspace / "data" / "other-tokenizer"
    if not other.exists():
        shutil.copytree(prepared[0], other)
        summary = json.loads((other / "summary.json").read_text())
        summary["settings"]["tokenizer_fingerprint"] = "0" * 40
        (other / "summary.json").write_text(json.dumps(summary))
    seq_len = prepared[0].name.split("-")[1]
    code = main(run_args(workspace, "mismatch", "pair=false", "phase_order=[pretrain]",
                         f"phases.pretrain.seq_len={seq_len}", f"data.pretrain=[{{path: {other}}}]"))
    assert code == 2
    assert "was prepared with another tokenizer" in capsys.readouterr().err


def test_console_shows_the_decisive_lines_and_no_lightning_banners(tmp_path, capfd):
    cfg = compose("smoke", [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}",
                            "run_name=console", "pair=false", "phase_order=[pretrain]",
                            "phases.pretrain.tokens=3_000", "phases.pretrain.warmup_tokens=0",
                            "trainer.num_workers=0", "export_at_end=false"])
    train(cfg)
    console = capfd.readouterr()
    text = console.out + console.err
    assert "training the built-in tokenizer" in text and "preparing the built-in corpus" in text
    assert "recipe smoke: size tiny, objective mlm" in text and "phases: pretrain 3k tokens at 128" in text
    assert f"resolved config: {cfg.run_dir / 'config.yaml'}" in text
    assert "seed: 21" in (cfg.run_dir / "config.yaml").read_text()  # the whole config, in the file only
    assert "seed: 21" not in text
    assert text.count("ModernBert: ") == 1  # the phase's model, not the start-up checks' estimates
    for banner in ("GPU available", "TPU available", "litlogger", "max_epochs=1"):
        assert banner not in text, banner
