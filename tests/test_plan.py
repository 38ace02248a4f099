"""A phase resolved once into its PhasePlan (ettin.train.plan): the builders take the plan, every
checkpoint records it, the report reads it back (and still reads runs written before plans), and
LoaderState alone carries the loader's position and digests."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest

from ettin.data.loader import LoaderState, StepBatch, rows_digest
from ettin.objectives import OBJECTIVES
from ettin.store.checkpoints import list_checkpoints, read_meta
from ettin.train.config import compose
from ettin.train.run import train


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """A one-phase run of a mix, with a mid-phase checkpoint and a phase-end one."""
    root = tmp_path_factory.mktemp("plan")
    cfg = compose("smoke", [f"output_dir={root / 'runs'}", f"data_dir={root / 'data'}", "run_name=mixed",
                            "pair=false", "phase_order=[pretrain]", "phases.pretrain.tokens=6_000",
                            "phases.pretrain.checkpoint_every_tokens=3_000", "phases.pretrain.warmup_tokens=0",
                            "objective_mix={mlm: 3, clm: 1}", "export_as=encoder", "trainer.num_workers=0",
                            "export_at_end=false"])
    train(cfg)
    return cfg


def test_every_checkpoint_records_the_phase_plan_as_resolved_from_the_config(mixed_run):
    cfg = mixed_run
    checkpoints = list_checkpoints(cfg.run_dir)
    assert len(checkpoints) >= 2
    p = cfg.phases["pretrain"]
    for checkpoint in checkpoints:
        plan = read_meta(checkpoint)["plan"]
        assert json.loads(json.dumps(plan)) == plan  # plain data
        assert plan["phase"] == "pretrain" and plan["seed"] == cfg.seed
        assert plan["phase_config"]["tokens"] == p.tokens and plan["phase_config"]["seq_len"] == p.seq_len
        assert plan["objective_mix"]["members"] == [
            {"objective": "mlm", "weight": 3.0, "attention": "bidirectional"},
            {"objective": "clm", "weight": 1.0, "attention": "causal"}]
        assert plan["objective_mix"]["side"] == "encoder"
        assert plan["step_settings"]["group_weights"] == [0.75, 0.25]
        assert plan["step_settings"]["lr"] == cfg.optim.lr * p.lr_scale
        assert plan["mask_rate"] == {"start": p.mask_rate, "end": p.mask_rate, "tokens": p.tokens}
        assert plan["intervals"] == {"checkpoint_every_tokens": 3_000, "val_every_tokens": p.val_every_tokens,
                                     "log_every_steps": cfg.trainer.log_every_steps}
        assert plan["model"]["vocab_size"] == read_meta(checkpoint)["model_config"]["vocab_size"]
        assert plan["data"] == read_meta(checkpoint)["data"]


def test_the_report_reads_the_plan_and_still_reads_runs_written_before_plans(mixed_run, tmp_path):
    from ettin.report.runs import load_run, recorded_phase_config

    run = load_run(mixed_run.run_dir)
    assert run.plan("pretrain") is not None
    assert run.phase_mix("pretrain").name == "mlm:3+clm:1" and run.kind == "encoder"
    # The plan, not config.yaml, is read: a config.yaml edited after training does not change it.
    copy = tmp_path / "mixed"
    shutil.copytree(mixed_run.run_dir, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace("seq_len: 128", "seq_len: 64"))
    assert load_run(copy).phase_config("pretrain").seq_len == 128
    # A run written before plans: the same answers from config.yaml.
    (copy / "config.yaml").write_text(config)
    for checkpoint in list_checkpoints(copy):
        meta = json.loads((checkpoint / "meta.json").read_text())
        del meta["plan"]
        (checkpoint / "meta.json").write_text(json.dumps(meta))
    old = load_run(copy)
    assert old.plan("pretrain") is None
    assert old.phase_mix("pretrain").name == "mlm:3+clm:1" and old.kind == "encoder"
    assert old.phase_config("pretrain") == run.phase_config("pretrain")
    assert recorded_phase_config(old, "pretrain")["seq_len"] == 128


def test_builders_callbacks_loggers_and_the_loader_take_the_plan_not_the_config():
    from ettin.train import callbacks, loggers, phase

    for function in (phase.build_model, phase.build_module, phase.PhaseData, phase.build_trainer,
                     loggers.build_loggers, callbacks.CheckpointCallback, callbacks.ValidationCallback):
        parameters = list(inspect.signature(function).parameters)
        assert parameters[0] == "plan" and "cfg" not in parameters and "phase" not in parameters, function


def test_loader_state_carries_the_position_and_the_digest_through_resume_steps_and_ranks():
    import numpy as np

    assert LoaderState.resumed(None) == LoaderState()
    # A checkpoint written before digests: the digest is unknown, not restarted.
    assert LoaderState.resumed({"step": 2, "samples": 8, "tokens": 900}) == LoaderState(2, 8, 900, None)
    resumed = LoaderState.resumed({"step": 2, "samples": 8, "tokens": 900, "data_digest": "0" * 63 + "5"})
    assert resumed.on_rank(0) == resumed and resumed.on_rank(1).data_digest == "0" * 64
    rows = [(8, np.arange(10)), (9, np.arange(5))]
    batch = StepBatch([], LoaderState(3, 10, 950), 2, 50, rows_digest=rows_digest(rows, 16))
    after = resumed.after(batch)
    assert (after.step, after.samples, after.tokens) == (3, 10, 950)
    expected = (5 + int(rows_digest(rows, 16), 16)) % (1 << 256)
    assert int(after.data_digest, 16) == expected
    # The ranks' parts add up to the digest of all their rows, in any split.
    one, two = rows_digest(rows[:1], 16), rows_digest(rows[1:], 16)
    assert LoaderState().of_all_ranks([one, two]).data_digest == rows_digest(rows, 16)
    assert LoaderState().of_all_ranks([one, None]).data_digest is None


def test_plan_phase_resolves_the_model_the_mix_with_its_attention_and_the_data_once(mixed_run):
    from ettin.train.phase import resolve_tokenizer
    from ettin.train.plan import check_phases_data, plan_phase

    cfg = mixed_run
    tokenizer = resolve_tokenizer(cfg)
    plan = plan_phase(cfg, "pretrain", tokenizer, check_phases_data(cfg, tokenizer)["pretrain"],
                      fresh_optimizer=True)
    assert [m.attention for m in plan.mix.members] == [OBJECTIVES["mlm"].attention, OBJECTIVES["clm"].attention]
    assert plan.objective is OBJECTIVES["mlm"] and not plan.model.causal  # export_as=encoder
    assert plan.model.vocab_size % 64 == 0 and plan.model.vocab_size >= len(tokenizer)
    assert plan.batch_schedule(plan.tokens) == cfg.global_batch
    # What the run recorded is this same resolution.
    recorded = read_meta(list_checkpoints(cfg.run_dir)[-1])["plan"]
    assert json.loads(json.dumps(plan.as_dict())) == recorded
