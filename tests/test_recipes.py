"""Recipes compose, validate and describe themselves; the config system rejects what cannot run."""

import pytest
import torch

from ettin.model.config import SIZES as SIZE_TABLE
from ettin.model.modernbert import ModernBert
from ettin.train.config import ConfigError, available_recipes, compose
from ettin.train_command import dry_run_report
from ettin.train_command import main

SIZES = [name for name, row in SIZE_TABLE.items() if row.parameters]  # the Ettin sizes
FAMILIES = ["encoder", "decoder", "encoder_from_decoder", "decoder_from_encoder"]


def test_every_size_and_family_ships_a_recipe():
    expected = {f"{family}_{size}" for family in FAMILIES for size in SIZES} | {"smoke"}
    assert expected <= set(available_recipes())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [f"{f}_{s}" for f in FAMILIES for s in SIZES])
def test_recipe_builds_its_model_on_meta_with_the_right_parameter_count(recipe):
    cfg = compose(recipe)
    size = recipe.rsplit("_", 1)[1]
    for phase in cfg.phases_to_run():
        with torch.device("meta"):
            model = ModernBert(cfg.model_config(phase))
        assert model.num_parameters() == SIZE_TABLE[size].parameters
        assert model.config.causal == cfg.objective.startswith("clm")


def test_three_phases_follow_the_ettin_values():
    cfg = compose("decoder_150m")
    assert cfg.objective == "clm" and cfg.phase_order == ["pretrain", "extension", "decay"]
    pre, ext, dec = (cfg.phases[p] for p in cfg.phase_order)
    assert (pre.tokens, ext.tokens, dec.tokens) == (1_700_000_000_000, 250_000_000_000, 50_000_000_000)
    assert (pre.seq_len, ext.seq_len, dec.seq_len) == (1024, 8000, 8000)
    assert cfg.optim.lr == 8e-4 and cfg.optim.weight_decay == 1e-5 and cfg.global_batch == 4608
    assert pre.warmup_tokens == 3_000_000_000 and pre.batch_warmup_tokens == 50_000_000_000
    assert (pre.global_rope_theta, pre.local_rope_theta) == (10_000, 10_000)
    assert (ext.global_rope_theta, ext.local_rope_theta) == (160_000, 160_000)
    assert dec.lr_scale == 0.5 and dec.final_lr_ratio == 0.04 and ext.final_lr_ratio == 0.5
    encoder = compose("encoder_150m")
    assert [encoder.phases[p].mask_rate for p in encoder.phase_order] == [0.3, 0.3, 0.15]


def test_one_billion_has_shorter_later_phases():
    cfg = compose("encoder_1b")
    assert cfg.phases["extension"].tokens == 83_333_000_000
    assert cfg.phases["decay"].tokens == 16_667_000_000


def test_cross_objective_recipes():
    cfg = compose("encoder_from_decoder_150m")
    cross = cfg.phases["cross"]
    assert cfg.objective == "mntp" and cfg.init == "runs/decoder_150m" and cfg.init_mode == "weights"
    assert cross.tokens == 50_000_000_000 and cross.lr_scale == 0.5
    assert (cross.warmup_tokens, cross.decay_tokens, cross.final_lr_ratio) == (3_000_000_000, 10_000_000_000, 0.02)
    assert (cross.global_rope_theta, cross.local_rope_theta, cross.seq_len) == (160_000, 160_000, 8000)
    assert compose("encoder_from_decoder_150m", ["objective=mlm"]).objective == "mlm"
    assert compose("decoder_from_encoder_68m").objective == "clm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["no_such_key=1"], "no_such_key"),
        (["phases.pretrain.tokenz=3"], "tokenz"),
        (["size=3m"], "3m"),
        (["objective=xlm"], "choose one of mlm, clm, mntp"),
        (["phase=warmup"], "choose one of pretrain, extension, decay"),
        (["phases.pretrain.lr_schedule=cosine"], "choose one of wsd, one_minus_sqrt"),
        (["phases.pretrain.seq_len=abc"], "seq_len"),
        (["phases.pretrain.warmup_tokens=2_000_000_000_000"], "exceed"),
        (["init_revision=step599525"], "without init"),
        (["trainer.strategy=zero3"], "choose one of ddp, fsdp"),
        (["init_mode=optimizer"], "choose one of"),
        (["pack_micro_batches=yes"], "choose auto, true or false"),
        (["pack_micro_batches=true", "optim.loss_normalization=micro_batch"],
         "use loss_normalization=tokens to pack, or pack_micro_batches=false"),
    ],
)
def test_bad_configuration_fails_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose("decoder_150m", overrides)


@pytest.mark.parametrize("overrides, packs", [
    ([], False),  # sdpa: a packed micro-batch's [rows, max_seqlen] grid would grow with its rows
    (["model.attn_implementation=flex"], True),
    (["model.attn_implementation=flash"], True),
    (["model.attn_implementation=flex", "optim.loss_normalization=micro_batch"], False),
    (["pack_micro_batches=true"], True),
    (["model.attn_implementation=flex", "pack_micro_batches=false"], False),
])
def test_micro_batches_pack_by_default_where_it_changes_no_gradient_and_costs_no_memory(overrides, packs):
    cfg = compose("decoder_150m", overrides)
    assert cfg.pack_micro_batches in ("auto", True, False)
    assert cfg.packs_micro_batches() is packs


def test_unknown_recipe_lists_the_choices(capsys):
    assert main(["recipe=decoder_15m"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'decoder_15m'" in err and "decoder_150m" in err and "smoke" in err


def test_dry_run_prints_counts_flops_and_schedule(capsys):
    assert main(["recipe=decoder_150m", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "149,655,232 parameters" in out
    assert "GFLOP per token" in out
    assert "micro-batches of 72 rows" in out  # sdpa: not packed (pack_micro_batches=auto)
    assert "1,700,000,000,000 tokens" in out
    assert "extension" in out and "decay" in out
    assert "160000" in out.replace(",", "").replace("_", "")


def test_dry_run_report_needs_no_data_or_tokenizer():
    report = dry_run_report(compose("encoder_1b"))
    assert "1,031,314,112 parameters" in report


def test_any_model_field_is_set_the_plain_way_and_a_misspelt_one_fails():
    assert compose("smoke", ["model.vocab_size=4096"]).model["vocab_size"] == 4096
    with pytest.raises(ConfigError, match="unknown ModelConfig field.*vocab_sise"):
        compose("smoke", ["model.vocab_sise=4096"])


def test_batch_warmup_tokens_zero_means_a_constant_batch_whatever_batch_warmup_min_says():
    from ettin.optim.schedule import phase_batch_schedule

    cfg = compose("encoder_150m", ["global_batch=2", "phases.pretrain.batch_warmup_tokens=0"])
    pre = cfg.phases["pretrain"]
    assert pre.batch_warmup_min == 288  # the size table's, not read without a warmup
    schedule = phase_batch_schedule(pre, cfg.global_batch)
    assert [schedule(t) for t in (0, 10**6, pre.tokens)] == [2, 2, 2]


def test_a_global_batch_below_the_batch_warmup_start_is_one_error_line_naming_both_keys(capsys):
    assert main(["recipe=encoder_150m", "global_batch=2", "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "phases.pretrain.batch_warmup_min=288" in err[0] and "global_batch=2" in err[0]
    assert "phases.pretrain.batch_warmup_tokens=0" in err[0]  # the fix
