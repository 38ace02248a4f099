"""python -m ettin.export: a checkpoint becomes a folder that plain transformers loads with our logits,
with the objective's tokenizer template; a folder that would not reproduce the model never replaces
a good one.

The checkpoints are made here, as the trainer writes them (write_checkpoint + meta), from loud tiny
models and a tokenizer trained on generated text: no training run needed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

import ettin.model.export
import ettin.model.hub
from ettin.store.checkpoints import save_weights, write_checkpoint
from ettin.model.config import model_config
from ettin.data.tokenizer import special_ids, train_tokenizer
from ettin.model.export import load_checkpoint_model, main
from ettin.model.modernbert import ModernBert

from test_model import MODERATE_STD, assert_logits_close, make_loud

WORDS = "alpha beta gamma delta module function class return value import print list".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + "." for i in range(200)]
SAMPLES = ["alpha beta gamma " * 30, "print the value.", "x"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TEXTS, 320, out)
    return out


def make_run(root, tokenizer_dir, *, objective: str, export_as=None, **config_overrides):
    """A run folder holding one checkpoint of a loud tiny model, as ettin.train.run writes it."""
    from ettin.data.tokenizer import load_tokenizer

    ids = special_ids(load_tokenizer(tokenizer_dir))
    config = model_config("tiny", vocab_size=320, window=4, global_attn_every_n_layers=3,
                          pad_token_id=ids.pad, bos_token_id=ids.cls, eos_token_id=ids.sep,
                          mask_token_id=ids.mask, causal=objective == "clm", **config_overrides)
    model = make_loud(ModernBert(config), weight_std=MODERATE_STD)
    meta = {"run_name": root.name, "recipe": "smoke", "objective": objective, "phase": "pretrain",
            "phase_end": True, "step": 10, "tokens": 1000, "git_commit": "abc1234",
            "model_config": dataclasses.asdict(config), "tokenizer": str(tokenizer_dir)}
    if export_as is not None:  # what the run chose (checkpoints record the mix's side)
        meta["export_as"] = export_as
    write_checkpoint(root, "pretrain-step0000010", lambda d: save_weights(model.state_dict(), d), meta)
    return root


@pytest.fixture(scope="module", params=["mlm", "clm"])
def exported(request, tmp_path_factory, tokenizer_dir):
    """(run dir, export folder, objective), exported through the command line."""
    root = tmp_path_factory.mktemp(f"run-{request.param}")
    run = make_run(root / "run", tokenizer_dir, objective=request.param)
    out = root / "hf"
    assert main([str(run), str(out)]) == 0
    return run, out, request.param


@pytest.mark.slow
def test_transformers_reproduces_the_exported_model(exported, capsys):
    run, out, objective = exported
    ours, _ = load_checkpoint_model(run / "checkpoints" / "pretrain-step0000010")
    loader = AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM
    theirs = loader.from_pretrained(out).eval()  # as a user loads it: defaults, no arguments
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(SAMPLES, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = theirs(**batch).logits
        logits = ours(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert_logits_close(logits[real], expected[real], tolerance=1e-4)
    assert expected[real].abs().max() > 1  # loud enough that a wrong layer would show


def test_the_folder_holds_what_a_user_needs(exported):
    _, out, objective = exported
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "README.md"} <= files
    assert ("generation_config.json" in files) == (objective == "clm")
    assert not out.with_name("hf.partial").exists()
    card = (out / "README.md").read_text()
    assert "recipe `smoke`" in card and "abc1234" in card
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("modernbert-decoder" if objective == "clm" else "modernbert")
    assert config["attention_dropout"] == 0.0  # pretraining dropout is not part of the release


def test_a_prefix_lm_checkpoint_is_refused_with_the_reason_and_the_choices(tmp_path, tokenizer_dir, capsys):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="prefix_lm")
    assert main([str(run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: objective prefix_lm attends bidirectionally over a prefix")
    assert "export_as=encoder or export_as=decoder" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()  # nothing written


def test_a_prefix_lm_run_that_chose_export_as_exports_that_class_and_says_so(tmp_path, tokenizer_dir):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="prefix_lm", export_as="encoder")
    assert main([str(run), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "modernbert"
    assert "Attention differs from training" in (tmp_path / "hf" / "README.md").read_text()


def test_tokenizer_template_matches_the_objective_in_python_and_rust(exported):
    _, out, objective = exported
    python_side = AutoTokenizer.from_pretrained(out)
    rust_side = Tokenizer.from_file(str(out / "tokenizer.json"))
    cls, sep = python_side.cls_token_id, python_side.sep_token_id
    for text in SAMPLES:
        ids = python_side(text)["input_ids"]
        assert ids == rust_side.encode(text).ids
        assert ids[0] == cls
        if objective == "clm":  # a decoder continues the text: BOS, no EOS
            assert sep not in ids
        else:
            assert ids[-1] == sep and ids.count(sep) == 1


def test_bf16_export(tmp_path, tokenizer_dir):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="mlm")
    assert main([str(run), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", dtype="auto")
    assert reloaded.dtype == torch.bfloat16  # the folder says bf16 and stores bf16


@pytest.mark.slow
def test_an_export_transformers_would_not_reproduce_never_replaces_a_good_one(tmp_path, tokenizer_dir,
                                                                              monkeypatch, capsys):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="clm")
    out = tmp_path / "hf"
    assert main([str(run), str(out)]) == 0
    good = (out / "config.json").read_text()
    real_config = ettin.model.hub.to_hf_config

    def one_token_short(*args, **kwargs):  # the classic decoder window mistake
        config = real_config(*args, **kwargs)
        config["sliding_window"] -= 1
        config["local_attention"] -= 2
        return config

    monkeypatch.setattr(ettin.model.hub, "to_hf_config", one_token_short)
    assert main([str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "transformers does not reproduce the exported model" in err and "hf.partial" in err
    assert (out / "config.json").read_text() == good  # the previous export is untouched
    assert (tmp_path / "hf.partial" / "config.json").exists()  # the bad one is kept for inspection


def test_bad_sources_are_named(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "hf")]) == 2
    assert "neither an ettin run folder nor a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    assert main([str(tmp_path / "empty-run"), str(tmp_path / "hf")]) == 2
    assert "has no complete checkpoint yet" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_decoder_with_two_thetas_needs_the_flag(tmp_path, tokenizer_dir, capsys, ettin_log):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="clm", local_rope_theta=10_000.0,
                   global_rope_theta=160_000.0)
    assert main([str(run), str(tmp_path / "hf")]) == 2
    assert "--allow-theta-mismatch" in capsys.readouterr().err
    assert main([str(run), str(tmp_path / "hf"), "--allow-theta-mismatch"]) == 0
    if ettin.model.hub.transformers_major() < 5:
        assert "verify this export with transformers >= 5" in ettin_log.text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0


def test_decoder_export_generates_to_the_callers_length_and_pads_on_the_left(tmp_path, tokenizer_dir):
    from transformers import GenerationConfig

    out = tmp_path / "hf"
    assert main([str(make_run(tmp_path / "run", tokenizer_dir, objective="clm")), str(out)]) == 0

    assert "max_new_tokens" not in json.loads((out / "generation_config.json").read_text())
    assert GenerationConfig.from_pretrained(out).max_new_tokens is None  # a caller's max_length applies
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["x", "alpha beta gamma delta"], padding=True)
    assert batch["attention_mask"][0][-1] == 1 and batch["attention_mask"][0][0] == 0


def test_config_and_card_name_the_objective_lora_targets_and_tools(exported):
    _, out, objective = exported
    config = json.loads((out / "config.json").read_text())
    assert config["ettin_objective"] == objective
    assert config["ettin_predicts_next_token"] is (objective == "clm")
    assert "torch_dtype" not in config and config["dtype"] == "float32"
    card = (out / "README.md").read_text()
    model = (AutoModelForCausalLM if objective == "clm" else AutoModelForMaskedLM).from_pretrained(out)
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and ".layers." in name}
    targets = ettin.model.export.LORA_TARGETS[objective == "clm"]
    assert set(targets) == names and str(targets) in card  # every projection, by transformers' name
    assert "SentenceTransformer(" in card and "lm_eval.simple_evaluate" in card
    assert "MNTP" not in card


@pytest.mark.slow
def test_an_mntp_export_says_it_predicts_from_the_previous_position(tmp_path, tokenizer_dir):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="mntp")
    assert main([str(run), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["ettin_objective"], config["ettin_predicts_next_token"]) == (
        "modernbert", "mntp", True)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "position j - 1" in card and "fill-mask" in card


@pytest.mark.slow
def test_a_folder_that_is_not_an_export_is_never_deleted(tmp_path, tokenizer_dir, capsys):
    run = make_run(tmp_path / "run", tokenizer_dir, objective="mlm")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert main([str(run), str(precious)]) == 2
    err = capsys.readouterr().err
    assert str(precious) in err and "--overwrite" in err
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert not (tmp_path / "precious.partial").exists()
    # an earlier export and an empty folder are replaced without the flag; anything with it
    assert main([str(run), str(tmp_path / "hf")]) == 0 and main([str(run), str(tmp_path / "hf")]) == 0
    (tmp_path / "empty").mkdir()
    assert main([str(run), str(tmp_path / "empty")]) == 0
    assert main([str(run), str(precious), "--overwrite"]) == 0
    assert not (precious / "thesis.tex").exists() and (precious / "config.json").exists()
