"""Hugging Face interop: our ModernBert <-> transformers' ModernBertForMaskedLM (encoder) and
ModernBertDecoderForCausalLM (decoder) folders.

Our weight names are the encoder's, so the whole weight mapping is two differences for the decoder:
the fused ``attn.Wqkv`` is split into ``q_proj``/``k_proj``/``v_proj``, and the prediction head is
called ``lm_head`` instead of ``head`` (``convert_state_dict``). Configs carry the decisions of
docs/design.md:

* windows are explicit in tokens here. Encoder: ``local_attention = 2 * window`` (symmetric).
  Decoder: transformers counts the query itself, ``sliding_window = window + 1``; 4.57 does not
  serialize ``local_attention`` and recomputes the window from it on reload, so it is written too
  (``local_attention = 2 * sliding_window``).
* rope thetas are written as numbers in both the legacy keys (``global_rope_theta`` /
  ``local_rope_theta``, read by transformers 4.x) and the 5.x keys (``rope_parameters``), with
  explicit ``layer_types``. transformers 4.x decoders apply the global theta on every layer, so a
  decoder with different thetas is refused unless ``allow_theta_mismatch`` (then only 5.x reproduces it).
* importing resolves a config.json with the installed transformers' own config class, so a folder
  runs here exactly as transformers runs it.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from ettin.store.checkpoints import retie
from ettin.objectives import OBJECTIVES, UNMASKING_DEFAULTS
from ettin.model.config import ModelConfig
from ettin.model.modernbert import ModernBert

log = logging.getLogger("ettin")

ENCODER_TYPE = "modernbert"
DECODER_TYPE = "modernbert-decoder"
ARCHITECTURES = {ENCODER_TYPE: "ModernBertForMaskedLM", DECODER_TYPE: "ModernBertDecoderForCausalLM"}
QKV = ("q_proj", "k_proj", "v_proj")


class HubError(ValueError):
    """A folder or config that cannot be converted; the message names the problem and the fix."""


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ---------------------------------------------------------------------------------------------------
# Weights


def convert_state_dict(state: dict[str, torch.Tensor], *, to: str) -> dict[str, torch.Tensor]:
    """The one weight conversion between layouts, used by import, export and cross-objective runs.

    ``to="decoder"``: ours (= transformers encoder layout) -> transformers decoder layout (split qkv,
    ``head`` -> ``lm_head``). ``to="ours"``: either transformers layout (with or without the
    ``model.`` prefix of the task classes) -> ours. ``to="encoder"`` returns ours minus the tied
    ``decoder.weight``, which transformers does not store."""
    if to not in ("ours", "encoder", "decoder"):
        raise ValueError(f"to={to!r}: choose ours, encoder or decoder")
    out: dict[str, torch.Tensor] = {}
    if to == "ours":
        fused: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if key.startswith(("layers.", "embeddings.", "final_norm.")):
                key = "model." + key  # a bare ModernBertModel / ModernBertDecoderModel
            if key.startswith("lm_head."):
                key = "head." + key[len("lm_head."):]
            parts = key.split(".")
            if len(parts) == 6 and parts[4] in QKV:  # model.layers.i.attn.q_proj.weight
                fused.setdefault(".".join(parts[:4] + ["Wqkv", parts[5]]), {})[parts[4]] = tensor
                continue
            out[key] = tensor
        for key, pieces in fused.items():
            missing = [p for p in QKV if p not in pieces]
            if missing:
                raise HubError(f"{key}: the checkpoint has no {', '.join(missing)}")
            out[key] = torch.cat([pieces[p] for p in QKV], dim=0)
        return out
    for key, tensor in state.items():
        if key == "decoder.weight":  # tied to the embeddings; transformers re-ties on load
            continue
        if to == "decoder":
            if key.startswith("head."):
                key = "lm_head." + key[len("head."):]
            if ".attn.Wqkv." in key:
                for name, piece in zip(QKV, tensor.chunk(3, dim=0)):
                    out[key.replace("Wqkv", name)] = piece.contiguous()
                continue
        out[key] = tensor
    return out


def _load_into(model: ModernBert, state: dict[str, torch.Tensor], source: str) -> None:
    """Load converted weights; the head and vocabulary bias may be absent (SequenceClassification
    and bare-backbone checkpoints): those keep their fresh init, and the log says so."""
    state = retie({k: v for k, v in state.items() if not k.startswith("classifier.")})
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    optional = [k for k in missing if k.startswith(("head.", "decoder."))]
    if unexpected or len(missing) > len(optional):
        raise HubError(
            f"{source}: the weights do not fit a ModernBERT model: unexpected "
            f"{unexpected[:6] or 'none'}, missing {[k for k in missing if k not in optional][:6] or 'none'}"
        )
    check_shapes(expected, state, source)
    model.load_state_dict(state, strict=False)
    if optional:
        log.warning("%s has no %s (a classification or bare model): freshly initialised",
                    source, ", ".join(optional))


def check_shapes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a HubError naming the first tensor of ``state`` whose shape differs from the model's
    (``expected``, our layout), both shapes, and the config value that would make them fit."""
    for key, model_tensor in expected.items():  # in the model's order: the embeddings first
        if key in state and state[key].shape != model_tensor.shape:
            have, want = tuple(state[key].shape), tuple(model_tensor.shape)
            raise HubError(
                f"{source}: {key} has shape {have} in the weights but {want} in the model; "
                f"{_shape_fix(key, have, want)}"
            )


def _shape_fix(key: str, have: tuple, want: tuple) -> str:
    """Which ModelConfig value explains a shape mismatch, and what to do about it."""
    if key in ("model.embeddings.tok_embeddings.weight", "decoder.weight", "decoder.bias") \
            and have[0] != want[0]:
        return (f"the vocabulary sizes differ ({have[0]:,} in the weights, {want[0]:,} in the model). "
                f"Set model.vocab_size={have[0]} (vocab_size in config.json) to load these weights, "
                "and use the tokenizer they were trained with; ettin never resizes a vocabulary "
                "implicitly")
    if key.endswith("mlp.Wi.weight") and have[0] != want[0]:
        return f"set model.intermediate_size={have[0] // 2} (intermediate_size in config.json)"
    if key.endswith("mlp.Wo.weight") and have[1] != want[1]:
        return f"set model.intermediate_size={have[1]} (intermediate_size in config.json)"
    return (f"set model.hidden_size={have[-1]} (hidden_size in config.json) or give the config the "
            "weights were trained with; config.json and the weights disagree")


# ---------------------------------------------------------------------------------------------------
# Configs


def to_hf_config(config: ModelConfig, *, causal: bool, allow_theta_mismatch: bool = False,
                 dtype: torch.dtype = torch.float32, objective: Optional[str] = None) -> dict:
    """config.json for transformers: legacy (4.x) and 5.x keys together, windows and thetas explicit.
    With ``objective`` (an ettin export) it also records ``ettin_objective`` and
    ``ettin_predicts_next_token``: whether the logits at position j predict the token at j + 1 (CLM,
    and MNTP, which transformers' fill-mask does not know: it reads a [MASK] at j from position j)."""
    model_type = DECODER_TYPE if causal else ENCODER_TYPE
    c = config
    if causal and c.local_rope_theta != c.global_rope_theta and not allow_theta_mismatch:
        raise HubError(
            f"this decoder uses local_rope_theta={c.local_rope_theta:g} and global_rope_theta="
            f"{c.global_rope_theta:g}; transformers 4.x decoders apply the global theta on every "
            "layer, so the export would not reproduce the model there. Export anyway for "
            "transformers >= 5 with allow_theta_mismatch (--allow-theta-mismatch), or train the "
            "decoder with equal thetas (the default policy, docs/recipes.md)."
        )
    layer_types = ["full_attention" if c.is_global_layer(i) else "sliding_attention"
                   for i in range(c.num_hidden_layers)]
    local_attention = 2 * (c.window + 1) if causal else 2 * c.window
    out = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "initializer_cutoff_factor": c.initializer_cutoff_factor,
        "norm_eps": c.norm_eps,
        "norm_bias": c.norm_bias,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "cls_token_id": c.bos_token_id,
        "sep_token_id": c.eos_token_id,
        "attention_bias": c.attention_bias,
        # transformers ties attention-probability and attention-output dropout to one value;
        # pretraining dropouts are not part of the released model.
        "attention_dropout": 0.0,
        "embedding_dropout": 0.0,
        "mlp_bias": c.mlp_bias,
        "mlp_dropout": 0.0,
        "decoder_bias": c.decoder_bias,
        "classifier_bias": c.head_bias,
        "classifier_activation": "gelu",
        "classifier_dropout": 0.0,
        "tie_word_embeddings": True,
        "global_attn_every_n_layers": c.global_attn_every_n_layers,
        "global_rope_theta": c.global_rope_theta,
        "local_rope_theta": c.local_rope_theta,
        "local_attention": local_attention,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": c.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_theta},
        },
        "dtype": str(dtype).removeprefix("torch."),
    }
    if objective is not None:
        if objective not in OBJECTIVES:
            raise HubError(f"objective={objective!r}: choose one of {', '.join(OBJECTIVES)}")
        out.update(ettin_objective=objective,
                   ettin_predicts_next_token=OBJECTIVES[objective].predicts_next_token)
        if OBJECTIVES[objective].bound:  # a masked diffusion model: how ettin.generate samples it
            out.update(ettin_generation=dict(UNMASKING_DEFAULTS))
    if causal:
        out.update(sliding_window=c.window + 1, use_cache=True)
    else:
        out.update(classifier_pooling="cls", sparse_prediction=False)
    return out


def from_hf_config(raw: dict, **overrides) -> tuple[ModelConfig, bool]:
    """(ModelConfig, causal) for a transformers ModernBERT config.json, resolved the way the
    installed transformers resolves it (defaults, legacy keys, window rules)."""
    from transformers import ModernBertConfig, ModernBertDecoderConfig

    model_type = raw.get("model_type")
    classes = {ENCODER_TYPE: ModernBertConfig, DECODER_TYPE: ModernBertDecoderConfig}
    if model_type not in classes:
        raise HubError(
            f"model_type {model_type!r} is not a ModernBERT model; ettin reads {ENCODER_TYPE!r} "
            f"(ModernBertForMaskedLM and its task variants) and {DECODER_TYPE!r} "
            "(ModernBertDecoderForCausalLM). A Composer/FlexBERT export (model_type 'bert') loads "
            "with init=<file.pt> through ettin.model.composer."
        )
    causal = model_type == DECODER_TYPE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = classes[model_type](**{k: v for k, v in raw.items() if k != "model_type"})
    layers = hf.num_hidden_layers
    # A folder saved by transformers >= 5 has only layer_types/rope_parameters (no legacy keys); 4.x
    # would silently run it with default thetas and layer pattern, so read what the file means.
    new_layout = transformers_major() >= 5 or ("rope_parameters" in raw and "global_rope_theta" not in raw)
    # transformers 4.x encoders keep a layer_types key as an inert attribute and use the legacy rule.
    if getattr(hf, "layer_types", None) and (causal or new_layout):
        is_global = [t == "full_attention" for t in hf.layer_types]
    else:
        is_global = [i % hf.global_attn_every_n_layers == 0 for i in range(layers)]
    every = next((n for n in range(1, layers + 1)
                  if is_global == [i % n == 0 for i in range(layers)]), None)
    if every is None:
        raise HubError(f"layer pattern {['G' if g else 'S' for g in is_global]} is not 'global "
                       "every n layers, starting with layer 0'; ettin's model cannot express it")
    rope = getattr(hf, "rope_parameters", None) if transformers_major() >= 5 else (
        raw.get("rope_parameters") if new_layout else None)
    global_theta, local_theta = _resolved_thetas(hf, causal, rope)
    window = hf.sliding_window - 1 if causal else hf.local_attention // 2
    config = ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=layers, num_attention_heads=hf.num_attention_heads,
        global_attn_every_n_layers=every, window=window, global_rope_theta=global_theta,
        local_rope_theta=local_theta, causal=causal, norm_eps=hf.norm_eps, norm_bias=hf.norm_bias,
        attention_bias=hf.attention_bias, mlp_bias=hf.mlp_bias, head_bias=hf.classifier_bias,
        decoder_bias=hf.decoder_bias, initializer_range=hf.initializer_range,
        initializer_cutoff_factor=hf.initializer_cutoff_factor,
        max_position_embeddings=hf.max_position_embeddings,
        pad_token_id=_id(hf.pad_token_id, ModelConfig.pad_token_id),
        bos_token_id=_id(getattr(hf, "cls_token_id", None) or hf.bos_token_id, ModelConfig.bos_token_id),
        eos_token_id=_id(getattr(hf, "sep_token_id", None) or hf.eos_token_id, ModelConfig.eos_token_id),
    )
    for name, expected in (("hidden_activation", "gelu"), ("classifier_activation", "gelu")):
        value = getattr(hf, name, expected)
        if value not in ("gelu", "gelu_python"):
            raise HubError(f"{name}={value!r}: ettin's ModernBERT uses exact GELU there")
    return replace(config, **overrides), causal


def _id(value, default: int) -> int:
    return default if value is None else int(value)


def _resolved_thetas(hf, causal: bool, rope: Optional[dict]) -> tuple[float, float]:
    """The (global, local) rope theta of this config: ``rope`` (the file's 5.x ``rope_parameters``,
    per layer type or one for all) where it applies, else what the installed transformers 4.x applies."""
    if rope:
        if "rope_theta" in rope:  # one set of parameters for every layer type
            return float(rope["rope_theta"]), float(rope["rope_theta"])
        return (float(rope["full_attention"]["rope_theta"]),
                float(rope["sliding_attention"]["rope_theta"]))
    global_theta = float(hf.global_rope_theta)
    if causal:  # transformers 4.x decoders build every rotary embedding from the global theta
        if hf.local_rope_theta not in (None, global_theta):
            log.warning("decoder config says local_rope_theta=%s, but transformers %d.x applies "
                        "global_rope_theta=%s on every layer; importing what transformers computes",
                        hf.local_rope_theta, transformers_major(), global_theta)
        return global_theta, global_theta
    local = hf.local_rope_theta
    return global_theta, float(global_theta if local is None else local)


# ---------------------------------------------------------------------------------------------------
# Folders


def save_hf(model: ModernBert, out_dir: Path | str, *, causal: Optional[bool] = None,
            dtype: torch.dtype = torch.float32, allow_theta_mismatch: bool = False,
            objective: Optional[str] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that plain transformers loads: an encoder as
    ModernBertForMaskedLM, a decoder (``causal``, default: the model's config) as
    ModernBertDecoderForCausalLM."""
    from safetensors.torch import save_file

    causal = model.config.causal if causal is None else causal
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = to_hf_config(model.config, causal=causal, allow_theta_mismatch=allow_theta_mismatch,
                          dtype=dtype, objective=objective)
    state = convert_state_dict(model.state_dict(), to="decoder" if causal else "encoder")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def resolve_folder(path_or_id: str, revision: Optional[str] = None) -> Path:
    """A local folder, or a hub id (with a revision such as ``step599525``) downloaded when online."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).startswith((".", "/", "~")):
        raise HubError(f"{path_or_id} is not a folder with a config.json; give a Hugging Face "
                       "model folder or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(path_or_id), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]))
    except Exception as error:  # offline, unknown repo or revision: one clear message
        raise HubError(
            f"cannot fetch {path_or_id!r}{f' at revision {revision!r}' if revision else ''} from the "
            f"Hugging Face hub ({type(error).__name__}: {error}); check the id and revision, the "
            "network, or download it and pass the local folder"
        ) from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder: safetensors (single or sharded) or a
    ``pytorch_model.bin`` read with ``weights_only=True``."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        from ettin.store.checkpoints import safe_torch_load

        return safe_torch_load(folder / "pytorch_model.bin")
    raise HubError(f"{folder} holds no model.safetensors, sharded safetensors or pytorch_model.bin")


def load_hf(path_or_id: str | Path, *, revision: Optional[str] = None, **overrides) -> ModernBert:
    """Our ModernBert from a transformers ModernBERT folder or hub id (encoder, decoder, or the
    backbone and head of a SequenceClassification variant). Decoders run causal."""
    folder = resolve_folder(str(path_or_id), revision)
    config_file = folder / "config.json"
    if not config_file.exists():
        raise HubError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    config, causal = from_hf_config(json.loads(config_file.read_text()), **overrides)
    model = ModernBert(config)
    _load_into(model, convert_state_dict(read_weights(folder), to="ours"), str(path_or_id))
    log.info("loaded %s from %s (%s)", "decoder" if causal else "encoder", path_or_id,
             json.dumps({k: v for k, v in asdict(config).items()
                         if k in ("window", "global_rope_theta", "local_rope_theta")}))
    return model
