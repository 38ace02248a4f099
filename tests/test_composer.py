"""Import of Composer / FlexBERT training checkpoints (ettin.model.composer).

The fake checkpoints are written here from an ettin model through the key table of the spec
(architecture.md §6.1-6.2), independently of the code under test: FlexBERT names, Composer's
``model.`` wrapper, the HuggingFace integration config, and optimi's StableAdamW state."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch
from test_train import SHORT

from ettin.model.composer import CONVERSION, ComposerLoadError, load_composer
from ettin.model.config import ModelConfig, model_config
from ettin.model.modernbert import ModernBert
from ettin.optim.stable_adamw import StableAdamW, param_group_names, param_groups

# Non-default window, layer pattern, thetas and eps, so a wrong config mapping changes logits.
CONFIG = model_config("tiny", vocab_size=512, window=8, global_attn_every_n_layers=2,
                      global_rope_theta=160_000.0, local_rope_theta=10_000.0, norm_eps=1e-6,
                      attention_output_dropout=0.1)
WEIGHT_DECAY = 1e-5


@dataclass
class Timestamp:
    """Stands in for Composer's pickled objects (composer.core.time.Timestamp)."""

    epoch: int
    batch: int


def loud_model(config: ModelConfig, seed: int = 0) -> ModernBert:
    """Weights with std 0.5 (the default init hides structural mistakes in tiny logits)."""
    torch.manual_seed(seed)
    model = ModernBert(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model.eval()


def flexbert_key(ours: str, causal: bool) -> str:
    """Our name -> FlexBERT name inside Composer's wrapper (the spec's §6.2 table)."""
    if ours.startswith("model.layers."):
        return "model.bert.encoder.layers." + ours[len("model.layers."):]
    if ours.startswith("model."):
        return "model.bert." + ours[len("model."):]
    if ours.startswith("head.") and causal:
        return "model.lm_head." + ours[len("head."):]
    return "model." + ours  # head.*, decoder.*


def flexbert_config(config: ModelConfig) -> dict:
    """FlexBertConfig.to_dict() as bert24 writes it, BertConfig leftovers included."""
    return {
        "model_type": "bert", "pad_token_id": 0, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
        "hidden_dropout_prob": 0.1, "type_vocab_size": 2, "head_class_act": "silu",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "hidden_act": "gelu",
        "head_pred_act": "gelu", "attention_layer": "rope", "bert_layer": "prenorm",
        "mlp_layer": "glu", "embedding_layer": "sans_pos", "encoder_layer": "base",
        "normalization": "layernorm", "norm_kwargs": {"eps": config.norm_eps, "bias": False},
        "embed_norm": True, "final_norm": True, "skip_first_prenorm": True, "head_pred_norm": True,
        "attn_qkv_bias": False, "attn_out_bias": False, "mlp_in_bias": False, "mlp_out_bias": False,
        "head_pred_bias": False, "decoder_bias": True,
        "sliding_window": 2 * config.window,
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "rotary_emb_base": config.global_rope_theta,
        "local_attn_rotary_emb_base": config.local_rope_theta, "rotary_emb_dim": None,
        "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
        "local_attn_rotary_emb_dim": None, "initial_attention_layer": None,
        "initial_bert_layer": None, "initial_mlp_layer": None,
        "attention_probs_dropout_prob": 0.0, "attn_out_dropout_prob": config.attention_output_dropout,
        "embed_dropout_prob": 0.0, "mlp_dropout_prob": 0.0, "init_std": 0.02, "init_cutoff_factor": 2.0,
    }


def optimi_state(model: ModernBert, optimizer: StableAdamW, causal: bool, named: bool) -> dict:
    """optimi StableAdamW's state dict as Composer saves it: keyed by FlexBERT name (torch's
    get_optimizer_state_dict, multi-GPU runs) or by position (single process)."""
    state, groups, position = {}, [], 0
    params = dict(model.named_parameters())
    for names, group in zip(param_group_names(model), optimizer.state_dict()["param_groups"]):
        ids = []
        for name in names:
            key = flexbert_key(name, causal) if named else position
            position += 1
            moments = optimizer.state[params[name]]
            state[key] = {"exp_avg": moments["exp_avg"].clone(), "exp_avg_sq": moments["exp_avg_sq"].clone(),
                          "eps_sq": torch.tensor(group["eps"] ** 2), "kahan_comp": None}
            ids.append(key)
        groups.append({"params": ids, "lr": group["lr"], "beta1": group["betas"][0],
                       "beta2": group["betas"][1], "eps": group["eps"],
                       "weight_decay": group["weight_decay"], "decouple_lr": True,
                       "max_lr": group["max_lr"], "kahan_sum": False, "foreach": True,
                       "gradient_release": False, "setup": True, "initial_lr": group["max_lr"],
                       "step": torch.tensor(group["step"], dtype=torch.int32)})
    return {"state": state, "param_groups": groups}


def composer_checkpoint(model: ModernBert, *, causal: bool = False, optimizer: StableAdamW = None,
                        named: bool = True, with_config: bool = True, tied_copy: bool = True) -> dict:
    flexbert = {flexbert_key(k, causal): v.clone() for k, v in model.state_dict().items()}
    flexbert["model.decoder.weight"] = flexbert["model.bert.embeddings.tok_embeddings.weight"]
    if not tied_copy:
        del flexbert["model.decoder.weight"]
    state = {"model": flexbert, "run_name": "ettin-150m", "rank_zero_seed": 17, "callbacks": {},
             "metadata": {"composer_env_info": {"composer_version": "0.22.0"}}}
    if with_config:
        model_class = "src.bert_layers.model.FlexBert" + ("ForCausalLM" if causal else "ForMaskedLM")
        state["integrations"] = {"huggingface": {"model": {"config": {
            "file_extension": ".json", "content": flexbert_config(model.config), "class": model_class}}}}
    if optimizer is not None:
        state["optimizers"] = {"StableAdamW": optimi_state(model, optimizer, causal, named)}
    return {"state": state, "rng": []}


def save(tmp_path, checkpoint: dict, name: str = "ep1-ba100-rank0.pt"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def logits(model: ModernBert) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=gen)  # 40 > 2 * window + 1
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 21:] = 0
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def trained_optimizer(model: ModernBert, steps: int = 3) -> StableAdamW:
    optimizer = StableAdamW(param_groups(model, WEIGHT_DECAY), lr=1e-3, weight_decay=WEIGHT_DECAY)
    for step in range(steps):
        apply_grads(model, seed=step)
        optimizer.step()
    return optimizer


def apply_grads(model: ModernBert, seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=gen) * torch.rand((), generator=gen) * 3


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["FlexBertForMaskedLM", "FlexBertForCausalLM"])
def test_import_reproduces_weights_config_and_logits(tmp_path, causal):
    config = replace(CONFIG, causal=causal)
    model = loud_model(config)
    path = save(tmp_path, composer_checkpoint(model, causal=causal))

    imported = load_composer(path)

    assert imported.model_config == config
    expected = model.state_dict()
    assert list(imported.model_state) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(imported.model_state[key], tensor), key
    assert imported.optimizer_state is None
    assert imported.meta["causal"] is causal and imported.meta["run_name"] == "ettin-150m"
    rebuilt = ModernBert(imported.model_config).eval()
    rebuilt.load_state_dict(imported.model_state)
    assert rebuilt.decoder.weight is rebuilt.model.embeddings.tok_embeddings.weight
    torch.testing.assert_close(logits(rebuilt), logits(model), rtol=0, atol=0)


def test_without_config_decoder_weight_and_bias_uses_sizes_and_zero_bias(tmp_path):
    config = model_config("tiny", vocab_size=512)  # ettin's default window, pattern and thetas
    model = loud_model(config)
    checkpoint = composer_checkpoint(model, with_config=False, tied_copy=False)
    del checkpoint["state"]["model"]["model.decoder.bias"]
    with torch.no_grad():
        model.decoder.bias.zero_()

    imported = load_composer(save(tmp_path, checkpoint))

    assert imported.model_config == config  # heads from the "tiny" row of SIZES
    assert torch.equal(imported.model_state["decoder.bias"], torch.zeros(512))
    assert any("SIZES" in note for note in imported.meta["notes"])
    rebuilt = ModernBert(imported.model_config).eval()
    rebuilt.load_state_dict(imported.model_state)
    torch.testing.assert_close(logits(rebuilt), logits(model), rtol=0, atol=0)


def test_flexbert_unset_values_mean_global(tmp_path):
    """local_attn_rotary_emb_base = -1 is the global theta (not a theta of -1, a public converter's
    bug); sliding_window = -1 makes every layer global."""
    checkpoint = composer_checkpoint(loud_model(CONFIG))
    content = checkpoint["state"]["integrations"]["huggingface"]["model"]["config"]["content"]
    content.update(local_attn_rotary_emb_base=-1, sliding_window=-1, global_attn_every_n_layers=-1)
    config = load_composer(save(tmp_path, checkpoint)).model_config
    assert config.local_rope_theta == config.global_rope_theta == 160_000.0
    assert all(config.is_global_layer(i) for i in range(config.num_hidden_layers))


def test_a_wrong_window_would_change_the_logits(tmp_path):
    """Negative control: the logit comparison above sees a config mistake."""
    model = loud_model(CONFIG)
    imported = load_composer(save(tmp_path, composer_checkpoint(model)))
    wrong = ModernBert(replace(CONFIG, window=CONFIG.window + 1)).eval()
    wrong.load_state_dict(imported.model_state)
    assert (logits(wrong) - logits(model)).abs().max() > 1e-2


def test_pickled_objects_are_refused_with_the_conversion_recipe(tmp_path):
    checkpoint = composer_checkpoint(loud_model(CONFIG))
    checkpoint["state"]["timestamp"] = Timestamp(epoch=1, batch=100)
    path = save(tmp_path, checkpoint)

    with pytest.raises(ComposerLoadError) as error:
        load_composer(path)
    message = str(error.value)
    assert "Timestamp" in message and "weights_only=True" in message
    assert CONVERSION in message

    # The documented conversion, run on the trusted file, gives a file that imports.
    converted = tmp_path / "OUT.pt"
    recipe = CONVERSION.replace("IN.pt", str(path)).replace("OUT.pt", str(converted))
    exec(compile(recipe, "conversion", "exec"), {})
    assert load_composer(converted).model_state.keys() == ModernBert(CONFIG).state_dict().keys()


@pytest.mark.parametrize("change, named", [
    ("unknown", "model.bert.encoder.layers.1.attn.rotary.weight"),
    ("missing", "model.layers.2.mlp.Wo.weight"),
    ("shape", "model.bert.final_norm.weight"),
    ("untied", "decoder.weight"),
    ("config", "mlp_layer='mlp'"),
])
def test_keys_that_do_not_fit_are_named(tmp_path, change, named):
    checkpoint = composer_checkpoint(loud_model(CONFIG))
    flexbert = checkpoint["state"]["model"]
    if change == "unknown":
        flexbert[named] = torch.zeros(4)
    elif change == "missing":
        del flexbert["model.bert.encoder.layers.2.mlp.Wo.weight"]
    elif change == "shape":
        flexbert[named] = torch.ones(7)
    elif change == "untied":
        flexbert["model.decoder.weight"] = flexbert["model.decoder.weight"] + 1
    else:
        checkpoint["state"]["integrations"]["huggingface"]["model"]["config"]["content"]["mlp_layer"] = "mlp"
    with pytest.raises(ComposerLoadError, match=named.replace("[", r"\[").replace(".", r"\.")):
        load_composer(save(tmp_path, checkpoint))


@pytest.mark.parametrize("named", [True, False], ids=["by-name", "by-position"])
def test_optimizer_state_continues_training_exactly(tmp_path, named):
    model = loud_model(CONFIG)
    optimizer = trained_optimizer(model)
    path = save(tmp_path, composer_checkpoint(model, optimizer=optimizer, named=named))

    imported = load_composer(path)
    assert imported.optimizer_state is not None
    rebuilt = ModernBert(imported.model_config)
    rebuilt.load_state_dict(imported.model_state)
    rebuilt_optimizer = StableAdamW(param_groups(rebuilt, 0.5), lr=0.5)  # all overwritten by the load
    rebuilt_optimizer.load_state_dict(imported.optimizer_state)
    assert [g["step"] for g in rebuilt_optimizer.param_groups] == [3, 3]

    for step in (3, 4):  # the same next steps from both
        for m, opt in ((model, optimizer), (rebuilt, rebuilt_optimizer)):
            apply_grads(m, seed=step)
            opt.step()
    for (name, expected), actual in zip(model.named_parameters(), rebuilt.parameters()):
        assert torch.equal(actual, expected), name


def test_optimizer_groups_that_differ_are_not_imported(tmp_path):
    model = loud_model(CONFIG)
    checkpoint = composer_checkpoint(model, optimizer=trained_optimizer(model))
    groups = checkpoint["state"]["optimizers"]["StableAdamW"]["param_groups"]
    moved = groups[1]["params"].pop()  # a decayed weight filed under no-decay
    groups[0]["params"].append(moved)
    imported = load_composer(save(tmp_path, checkpoint))
    assert imported.optimizer_state is None
    assert any("parameter groups" in note for note in imported.meta["notes"])


# ---------------------------------------------------------------------------------------------------
# End to end: python -m ettin.train ... init=<composer .pt>


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Arguments of a one-phase smoke encoder run and the model config it builds."""
    from ettin.train.config import compose
    from ettin.train.phase import resolve_tokenizer
    from ettin.train.plan import run_model_config

    root = tmp_path_factory.mktemp("composer-init")
    args = [f"output_dir={root / 'runs'}", f"data_dir={root / 'data'}", *SHORT,
            "phase_order=[pretrain]", "pair=false", "objective=mlm", "export_at_end=false", "eval_at_end=false",
            "phases.pretrain.tokens=8_192", "phases.pretrain.warmup_tokens=2_048"]
    cfg = compose("smoke", args)
    return root, args, run_model_config(cfg, "pretrain", resolve_tokenizer(cfg))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "weights+optimizer"])
def test_training_starts_from_a_composer_checkpoint(smoke_run, mode):
    from ettin.store.checkpoints import latest_checkpoint, load_weights, read_meta, safe_torch_load
    from ettin.train_command import main

    root, args, config = smoke_run
    model = loud_model(config)
    optimizer = trained_optimizer(model) if mode == "weights+optimizer" else None
    path = save(root, composer_checkpoint(model, optimizer=optimizer), f"{mode}.pt")
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    assert main([*args, f"run_name=from-composer-{mode}", f"init={path}", f"init_mode={mode}"]) == 0

    final = latest_checkpoint(root / "runs" / f"from-composer-{mode}")
    meta = read_meta(final)
    assert meta["phase"] == "pretrain" and meta["step"] > 1
    # The optimizer continued the imported one (3 steps before) or started afresh.
    steps = [g["step"] for g in safe_torch_load(final / "optimizer.pt")["param_groups"]]
    assert steps == [meta["step"] + (3 if optimizer else 0)] * 2
    trained = load_weights(final)
    # Trained from the imported weights: every tensor moved, none far (lr <= 3e-3, a few steps).
    for key, tensor in initial.items():
        change = (trained[key] - tensor).abs().max()
        assert 0 < change < 0.1, (key, change)
