"""ettin.model.hub: folders written by transformers import with identical logits, our exports reload in
transformers with identical logits, and what cannot be converted fails with a clear message.

The reference is always transformers reading the folder back with ``from_pretrained`` (not the
config object we built), so a value transformers does not serialize or re-derives on load (4.57's
decoder window, 4.x decoders' single theta) is caught. Tolerance: as tests/test_model.py (fp32,
two kernels summing in different orders)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, ModernBertConfig, ModernBertDecoderConfig,
                          ModernBertDecoderForCausalLM, ModernBertForMaskedLM,
                          ModernBertForSequenceClassification)

from ettin.model.hub import HubError, convert_state_dict, load_hf, save_hf, to_hf_config
from ettin.model.modernbert import ModernBert

from test_model import (GLOBAL_SLIDING_SLIDING_GLOBAL as GSSG, PAD, RAGGED, SHORT, VOCAB,
                        assert_logits_close, loud_model, make_loud, padded_batch)

SPECIALS = dict(pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, global_attn_every_n_layers=3,
             global_rope_theta=GSSG["global_rope_theta"])


def hf_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def ours_logits(model: ModernBert, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids, mask).logits


def assert_same_on_real_tokens(ours: ModernBert, theirs, batches=(RAGGED, SHORT)) -> None:
    for lengths in batches:
        ids, mask = padded_batch(lengths)
        real = mask.bool()
        assert_logits_close(ours_logits(ours, ids, mask)[real], hf_logits(theirs, ids, mask)[real])


def transformers_folder(tmp_path, hf_class, config):
    """A loud model saved by transformers itself, and transformers' own reload of that folder."""
    model = make_loud(hf_class._from_config(config, attn_implementation="eager"))
    model.save_pretrained(tmp_path)
    return hf_class.from_pretrained(tmp_path, attn_implementation="eager").eval()


# ------------------------------------------------------------------------------------------------
# Import


def test_encoder_folder_made_by_transformers_imports_with_its_logits(tmp_path):
    config = ModernBertConfig(local_attention=2 * GSSG["window"], local_rope_theta=GSSG["local_rope_theta"],
                              reference_compile=False, **SHAPE, **SPECIALS)
    theirs = transformers_folder(tmp_path, ModernBertForMaskedLM, config)
    ours = load_hf(tmp_path)
    c = ours.config
    assert (c.causal, c.window, c.global_attn_every_n_layers) == (False, GSSG["window"], 3)
    assert (c.global_rope_theta, c.local_rope_theta) == (GSSG["global_rope_theta"], GSSG["local_rope_theta"])
    assert_same_on_real_tokens(ours, theirs)


@pytest.mark.slow
@pytest.mark.parametrize("local_rope_theta", [GSSG["global_rope_theta"], 20.0])
def test_decoder_folder_made_by_transformers_imports_with_its_logits(tmp_path, local_rope_theta, ettin_log):
    """The decoder's window is whatever transformers derives on reload, and 4.x decoders apply the
    global theta everywhere (a differing local theta in the file is ignored, with a warning)."""
    window = GSSG["window"]
    config = ModernBertDecoderConfig(local_attention=2 * (window + 1), local_rope_theta=local_rope_theta,
                                     **SHAPE, **SPECIALS)
    theirs = transformers_folder(tmp_path, ModernBertDecoderForCausalLM, config)
    ours = load_hf(tmp_path)
    assert ours.config.causal and ours.config.window == theirs.config.sliding_window - 1
    assert_same_on_real_tokens(ours, theirs)
    if local_rope_theta != GSSG["global_rope_theta"]:
        assert "applies global_rope_theta" in ettin_log.text


def test_sharded_and_classification_folders_import_their_backbone(tmp_path):
    config = ModernBertConfig(local_attention=2 * GSSG["window"], reference_compile=False, num_labels=3,
                              **SHAPE, **SPECIALS)
    classifier = make_loud(ModernBertForSequenceClassification(config))
    classifier.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf(tmp_path)
    theirs = classifier.state_dict()
    for key, tensor in ours.state_dict().items():
        if key.startswith("model."):
            assert torch.equal(tensor, theirs[key]), key
    assert torch.equal(ours.state_dict()["head.dense.weight"], theirs["head.dense.weight"])


def test_pytorch_model_bin_loads_tensors_and_refuses_pickled_objects(tmp_path):
    model = loud_model()
    save_hf(model, tmp_path)
    state = convert_state_dict(model.state_dict(), to="encoder")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_on_real_tokens(load_hf(tmp_path), model)

    torch.save({**state, "extra": torch.nn.Linear(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model.bin.*weights_only=True"):
        load_hf(tmp_path)


def test_unknown_model_type_and_mismatched_shapes_are_named(tmp_path):
    save_hf(loud_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(HubError, match=r"model_type 'bert' is not a ModernBERT model.*ettin.model.composer"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(HubError, match=r"mlp.Wi.weight has shape \(192, 64\) in the weights but \(256, 64\) "
                                       r"in the model; set model.intermediate_size=96"):
        load_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(HubError, match="has no config.json"):
        load_hf(tmp_path)
    with pytest.raises(HubError, match="not a folder with a config.json"):
        load_hf(tmp_path / "missing")


def test_a_resized_vocabulary_names_the_tensor_both_shapes_and_the_fix(tmp_path):
    save_hf(loud_model(), tmp_path)
    with pytest.raises(HubError, match=rf"tok_embeddings.weight has shape \({VOCAB}, 64\) in the weights but "
                                       rf"\(128, 64\) in the model; the vocabulary sizes differ .*"
                                       rf"Set model.vocab_size={VOCAB}"):
        load_hf(tmp_path, vocab_size=128)


@pytest.mark.slow
@pytest.mark.parametrize("hf_class", [ModernBertForMaskedLM, ModernBertDecoderForCausalLM])
def test_a_folder_in_the_transformers_5_layout_imports_its_thetas_and_layer_pattern(tmp_path, hf_class):
    """transformers 5.x writes only layer_types and rope_parameters (no global_rope_theta,
    local_rope_theta, global_attn_every_n_layers); the reference is the same weights saved in the 4.x
    layout, as transformers 4.57 runs them. Thetas and pattern are all non-defaults."""
    causal = hf_class is ModernBertDecoderForCausalLM
    thetas = (1000.0, 1000.0) if causal else (1000.0, 30.0)  # 4.x decoders apply one theta
    shape = {**SHAPE, "global_attn_every_n_layers": 2, "global_rope_theta": thetas[0]}
    config_class = ModernBertDecoderConfig if causal else ModernBertConfig
    extra = {} if causal else {"reference_compile": False}
    config = config_class(local_attention=2 * (GSSG["window"] + causal), local_rope_theta=thetas[1],
                          **shape, **SPECIALS, **extra)
    theirs = transformers_folder(tmp_path, hf_class, config)
    written = json.loads((tmp_path / "config.json").read_text())
    for legacy in ("global_rope_theta", "local_rope_theta", "global_attn_every_n_layers"):
        written.pop(legacy, None)
    written["layer_types"] = ["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(4)]
    written["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": thetas[0]},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": thetas[1]}}
    (tmp_path / "config.json").write_text(json.dumps(written))
    ours = load_hf(tmp_path)
    c = ours.config
    assert (c.global_rope_theta, c.local_rope_theta, c.global_attn_every_n_layers) == (*thetas, 2)
    assert_same_on_real_tokens(ours, theirs)


# ------------------------------------------------------------------------------------------------
# Export


def test_exported_encoder_reloads_in_transformers_with_our_logits(tmp_path):
    ours = loud_model()
    save_hf(ours, tmp_path)
    theirs = ModernBertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert theirs.config.local_attention == 2 * GSSG["window"]
    assert_same_on_real_tokens(ours, theirs)
    assert_same_on_real_tokens(load_hf(tmp_path), theirs)  # and back


def test_exported_decoder_reloads_in_transformers_with_our_logits(tmp_path):
    """Window W (W previous tokens + self) is transformers' sliding_window W + 1; local_attention is
    written too because 4.57 recomputes the window from it on reload."""
    ours = loud_model(causal=True, local_rope_theta=GSSG["global_rope_theta"])
    save_hf(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["sliding_window"] == GSSG["window"] + 1
    assert written["local_attention"] == 2 * (GSSG["window"] + 1)
    assert written["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention",
                                      "full_attention"]
    theirs = ModernBertDecoderForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert theirs.config.sliding_window == GSSG["window"] + 1
    assert_same_on_real_tokens(ours, theirs)
    assert_same_on_real_tokens(load_hf(tmp_path), theirs)


def test_the_written_window_matters():
    """Negative control for the two tests above: one token less of window changes the logits."""
    ours = loud_model(causal=True, local_rope_theta=GSSG["global_rope_theta"])
    narrower = ModernBert(ours.config.__class__(**{**ours.config.__dict__, "window": GSSG["window"] - 1}))
    narrower.load_state_dict(ours.state_dict())
    ids, mask = padded_batch(RAGGED)
    real = mask.bool()
    assert (ours_logits(ours, ids, mask)[real] - ours_logits(narrower, ids, mask)[real]).abs().max() > 0.1


@pytest.mark.parametrize("causal", [False, True])
def test_exports_load_as_sequence_classifiers(tmp_path, causal):
    ours = loud_model(causal=causal, local_rope_theta=GSSG["global_rope_theta"])
    save_hf(ours, tmp_path)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    backbone = classifier.state_dict()
    for key, tensor in convert_state_dict(ours.state_dict(), to="decoder" if causal else "encoder").items():
        if key.startswith("model."):
            assert torch.equal(backbone[key], tensor), key
    ids, mask = padded_batch(SHORT)
    with torch.no_grad():
        assert classifier(input_ids=ids, attention_mask=mask).logits.shape == (2, 2)


def test_decoder_with_two_thetas_is_refused_unless_allowed(tmp_path):
    ours = loud_model(causal=True)  # GSSG: global 500, local 20
    with pytest.raises(HubError, match="allow_theta_mismatch"):
        save_hf(ours, tmp_path)
    save_hf(ours, tmp_path, allow_theta_mismatch=True)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["sliding_attention"]["rope_theta"] == GSSG["local_rope_theta"]
    assert written["local_rope_theta"] == GSSG["local_rope_theta"]


def test_bf16_export_stores_bf16_weights(tmp_path):
    from safetensors import safe_open

    save_hf(loud_model(), tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"  # not the deprecated torch_dtype


# ------------------------------------------------------------------------------------------------
# The one weight conversion


@pytest.mark.parametrize("layout", ["encoder", "decoder"])
def test_conversion_round_trips_and_fits_transformers_exactly(layout):
    ours = loud_model(causal=layout == "decoder", local_rope_theta=GSSG["global_rope_theta"])
    converted = convert_state_dict(ours.state_dict(), to=layout)
    config = to_hf_config(ours.config, causal=layout == "decoder")
    hf_class = ModernBertDecoderForCausalLM if layout == "decoder" else ModernBertForMaskedLM
    config_class = ModernBertDecoderConfig if layout == "decoder" else ModernBertConfig
    hf = hf_class(config_class(**{k: v for k, v in config.items() if k != "model_type"}))
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert unexpected == [] and missing == ["decoder.weight"]  # tied to the embeddings
    back = convert_state_dict(converted, to="ours")
    expected = {k: v for k, v in ours.state_dict().items() if k != "decoder.weight"}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())
    bare = {k.removeprefix("model."): v for k, v in converted.items() if k.startswith("model.")}
    assert set(convert_state_dict(bare, to="ours")) == {k for k in expected if k.startswith("model.")}


def test_a_hub_id_that_cannot_be_fetched_names_the_id_and_the_revision():
    with pytest.raises(HubError, match=r"cannot fetch 'jhu-clsp/ettin-encoder-17m' at revision 'step599525'"):
        load_hf("jhu-clsp/ettin-encoder-17m", revision="step599525")
