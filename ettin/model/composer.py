"""Import of the original Ettin / ModernBERT training checkpoints: Composer ``.pt`` files written by
orionw/bert24, whose model uses FlexBERT weight names.

A Composer checkpoint is ``torch.save({"state": {...}, "rng": [...]})``. Of ``state`` we read:

* ``model``: the FlexBERT state dict inside Composer's ``HuggingFaceModel`` wrapper
  (``model.bert.embeddings.tok_embeddings.weight``, ``model.bert.encoder.layers.{i}.attn.Wqkv.weight``,
  ``model.head.*`` or ``model.lm_head.*``, ``model.decoder.*``);
* ``integrations.huggingface.model.config``: ``{"content": FlexBertConfig.to_dict(), "class": ...}``,
  when present, for everything the tensors do not show (heads, window, layer pattern, rope thetas);
* ``optimizers``: ``{"StableAdamW": optimizer state dict}`` (optimi's StableAdamW), keyed by
  parameter name (multi-GPU runs) or by position (single process).

Only tensors, containers and plain values are ever unpickled (``torch.load(weights_only=True)``):
unpickling arbitrary objects can run code. Real Composer checkpoints also pickle Composer objects
(``Timestamp``, metrics, enums), so they must be converted once, in a trusted environment where
Composer is installed, with the three lines of ``CONVERSION`` (docs/composer.md).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from ettin.model.config import SIZES, ModelConfig
from ettin.model.modernbert import ModernBert
from ettin.optim.stable_adamw import param_group_names

log = logging.getLogger("ettin")

CONVERSION = """\
import torch  # in a trusted environment where composer (and bert24's src/) can be imported
state = torch.load("IN.pt", map_location="cpu", weights_only=False)["state"]
torch.save({"state": {k: state[k] for k in ("model", "optimizers", "integrations") if k in state}}, "OUT.pt")
"""

# FlexBERT options ettin's ModernBert implements, and the only value each may have. Checked only
# where the checkpoint carries its FlexBERT config.
REQUIRED_FLEXBERT = {
    "attention_layer": "rope",
    "bert_layer": "prenorm",
    "mlp_layer": "glu",
    "embedding_layer": "sans_pos",
    "normalization": "layernorm",
    "embed_norm": True,
    "final_norm": True,
    "skip_first_prenorm": True,
    "head_pred_norm": True,
    "hidden_act": "gelu",
    "head_pred_act": "gelu",  # the MLM/LM head activation (not head_class_act; docs/composer.md)
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "local_attn_rotary_emb_dim": None,
    "initial_attention_layer": None,
    "initial_bert_layer": None,
    "initial_mlp_layer": None,
}
FLEXBERT_ROOTS = ("bert.", "head.", "lm_head.", "decoder.")
EMBEDDINGS = "model.embeddings.tok_embeddings.weight"


class ComposerLoadError(ValueError):
    """A Composer checkpoint that cannot be imported; the message names the problem and the fix."""


class ComposerCheckpoint(NamedTuple):
    model_config: ModelConfig
    model_state: dict[str, torch.Tensor]  # our key names, decoder.weight tied to the embeddings
    optimizer_state: Optional[dict]  # loads into ettin's StableAdamW(param_groups(model, ...))
    meta: dict  # source, model_class, causal, flexbert_config, run_name, notes


def load_composer(path: str | Path) -> ComposerCheckpoint:
    """Read a Composer checkpoint (or its plain conversion) into our names and config."""
    path = Path(path)
    checkpoint = _load_plain(path)
    state = checkpoint.get("state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ComposerLoadError(f"{path} is not a Composer checkpoint: expected a dict with "
                                "state['model'] (the FlexBERT state dict)")
    notes: list[str] = []
    model_class, flexbert = _flexbert_config(state)
    renamed = {key: flexbert_key_to_ours(key) for key in state["model"]}
    causal = "CausalLM" in (model_class or "") or any(".lm_head." in f".{k}" for k in state["model"])
    model_state = _model_state(state["model"], renamed, path, notes)
    config = infer_config(model_state, flexbert, causal=causal, notes=notes)
    with torch.device("meta"):  # names and shapes only, no memory
        reference = ModernBert(config)
    _check_fits(model_state, reference.state_dict(), renamed, path)
    optimizer_state, why_not = convert_optimizer_state(state.get("optimizers"), state["model"],
                                                       renamed, reference)
    if optimizer_state is None and state.get("optimizers"):
        notes.append(f"optimizer state not imported: {why_not}")
    for note in notes:
        log.warning("%s: %s", path, note)
    meta = {
        "source": str(path),
        "model_class": model_class,
        "causal": causal,
        "flexbert_config": flexbert,
        "run_name": state.get("run_name") if isinstance(state.get("run_name"), str) else None,
        "notes": notes,
    }
    return ComposerCheckpoint(config, model_state, optimizer_state, meta)


# ---------------------------------------------------------------------------------------------------
# Reading the file


def _load_plain(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise ComposerLoadError(
            f"refusing to load {path}: it needs unpickling arbitrary Python objects"
            f"{' (' + found.group(1) + ')' if found else ''}, which can run code; ettin only loads "
            "tensors, containers and plain values (torch.load(weights_only=True)). Composer "
            "checkpoints pickle Composer objects (Timestamp, metrics, enums). If you trust the "
            "file, convert it once in an environment where composer is installed, keeping only the "
            f"plain parts, and pass the converted file instead:\n\n{CONVERSION}"
        ) from None


def _flexbert_config(state: dict) -> tuple[Optional[str], Optional[dict]]:
    """(model class name, FlexBertConfig.to_dict()) from Composer's HuggingFace integration."""
    try:
        entry = state["integrations"]["huggingface"]["model"]["config"]
    except (KeyError, TypeError):
        return None, None
    content = entry.get("content") if isinstance(entry, dict) else None
    if isinstance(content, str):
        content = json.loads(content)
    model_class = entry.get("class") if isinstance(entry, dict) else None
    return model_class, content if isinstance(content, dict) else None


# ---------------------------------------------------------------------------------------------------
# Weights


def flexbert_key_to_ours(key: str) -> str:
    """A FlexBERT key (with or without Composer's ``model.`` wrapper) in our names (= transformers'
    ModernBertForMaskedLM). Keys that are not FlexBERT come back unchanged and are reported later."""
    key = key.replace("_orig_mod.", "")  # torch.compile wrappers, defensively
    if key.startswith("module."):  # DDP, defensively
        key = key[len("module."):]
    if key.startswith("model.") and key[len("model."):].startswith(FLEXBERT_ROOTS):
        key = key[len("model."):]
    if key.startswith("bert.encoder.layers."):
        return "model.layers." + key[len("bert.encoder.layers."):]
    if key.startswith("bert."):
        return "model." + key[len("bert."):]
    if key.startswith("lm_head."):  # FlexBertForCausalLM's head is the same module under another name
        return "head." + key[len("lm_head."):]
    return key


def _model_state(flexbert_state: dict, renamed: dict[str, str], path: Path,
                 notes: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for original, key in renamed.items():
        if key.endswith(".inv_freq"):  # rotary frequencies: derived from theta, recomputed here
            continue
        if key in out:
            raise ComposerLoadError(f"{path}: two keys map to {key} (one of them is {original})")
        tensor = flexbert_state[original]
        if not isinstance(tensor, torch.Tensor):
            raise ComposerLoadError(f"{path}: state['model'][{original!r}] is not a tensor")
        out[key] = tensor
    if EMBEDDINGS not in out:
        raise ComposerLoadError(f"{path}: no token embeddings (model.bert.embeddings."
                                f"tok_embeddings.weight) in state['model']")
    embeddings = out[EMBEDDINGS]
    if "decoder.weight" in out and not torch.equal(out["decoder.weight"], embeddings):
        raise ComposerLoadError(f"{path}: decoder.weight differs from the token embeddings; ettin "
                                "ties them, so an untied checkpoint cannot be imported exactly")
    out["decoder.weight"] = embeddings
    if "decoder.bias" not in out:
        # FlexBERT with decoder_bias=false: a zero bias computes the same logits.
        out["decoder.bias"] = torch.zeros(embeddings.shape[0], dtype=embeddings.dtype)
        notes.append("no decoder.bias in the checkpoint: imported as zeros (same logits)")
    return out


def _check_fits(model_state: dict, expected: dict, renamed: dict[str, str], path: Path) -> None:
    original_of = {ours: original for original, ours in renamed.items()}
    unexpected = [original_of.get(k, k) for k in model_state if k not in expected]
    missing = [k for k in expected if k not in model_state]
    wrong = [f"{original_of.get(k, k)} {tuple(model_state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in model_state and model_state[k].shape != v.shape]
    if unexpected or missing or wrong:
        parts = [f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                 for label, names in (("unknown keys", unexpected), ("missing (our names)", missing),
                                      ("wrong shapes", wrong)) if names]
        raise ComposerLoadError(f"{path}: state['model'] does not fit a ModernBERT model; "
                                + "; ".join(parts))


# ---------------------------------------------------------------------------------------------------
# Config


def infer_config(model_state: dict[str, torch.Tensor], flexbert: Optional[dict], *, causal: bool,
                 notes: list[str]) -> ModelConfig:
    """Sizes and biases from the tensors; heads, attention pattern and thetas from the FlexBERT
    config (else a matching SIZES row / Ettin's defaults, noted in ``notes``)."""
    vocab, hidden = model_state[EMBEDDINGS].shape
    layer_ids = {int(k.split(".")[2]) for k in model_state if k.startswith("model.layers.")}
    if "model.layers.0.mlp.Wi.weight" not in model_state:
        raise ComposerLoadError("state['model'] has no bert.encoder.layers.0.mlp.Wi.weight")
    sizes = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=max(layer_ids) + 1,
        intermediate_size=model_state["model.layers.0.mlp.Wi.weight"].shape[0] // 2,
    )
    # The tensors decide which biases exist; a FlexBERT config that disagrees fails _check_fits.
    biases = dict(
        attention_bias="model.layers.0.attn.Wqkv.bias" in model_state,
        mlp_bias="model.layers.0.mlp.Wi.bias" in model_state,
        norm_bias="model.embeddings.norm.bias" in model_state,
        head_bias="head.dense.bias" in model_state,
    )
    if flexbert is None:
        notes.append("no FlexBERT config in the checkpoint (integrations): the window, layer pattern, "
                     "rope thetas and norm eps are ettin's defaults")
        return ModelConfig(**sizes, **biases, num_attention_heads=_heads_from_sizes(sizes, notes),
                           causal=causal)
    _check_flexbert(flexbert, sizes)
    sliding = flexbert.get("sliding_window", -1)
    every = flexbert.get("global_attn_every_n_layers", -1)
    if sliding > 0 and every <= 0:
        raise ComposerLoadError(f"sliding_window={sliding} on every layer (global_attn_every_n_layers="
                                f"{every}): ettin's layer 0 is always global")
    pattern = dict(window=sliding // 2, global_attn_every_n_layers=every) if sliding > 0 else dict(
        global_attn_every_n_layers=1)  # no sliding window: every layer global
    global_theta = float(flexbert.get("rotary_emb_base", 10000.0))
    local_theta = flexbert.get("local_attn_rotary_emb_base", -1)
    norm_kwargs = flexbert.get("norm_kwargs") or {}
    return ModelConfig(
        **sizes, **biases, **pattern,
        num_attention_heads=flexbert["num_attention_heads"],
        global_rope_theta=global_theta,
        # FlexBERT's "unset" value -1 means: the global theta.
        local_rope_theta=global_theta if local_theta == -1 else float(local_theta),
        causal=causal,
        norm_eps=float(norm_kwargs.get("eps", 1e-5)),  # not layer_norm_eps (BertConfig's 1e-12)
        embedding_dropout=float(flexbert.get("embed_dropout_prob", 0.0)),
        attention_dropout=float(flexbert.get("attention_probs_dropout_prob", 0.0)),
        attention_output_dropout=float(flexbert.get("attn_out_dropout_prob", 0.0)),
        mlp_dropout=float(flexbert.get("mlp_dropout_prob", 0.0)),
        initializer_range=float(flexbert.get("init_std", 0.02)),
        initializer_cutoff_factor=float(flexbert.get("init_cutoff_factor", 2.0)),
    )


def _check_flexbert(flexbert: dict, sizes: dict) -> None:
    problems = [f"{name}={flexbert[name]!r} (ettin implements {value!r})"
                for name, value in REQUIRED_FLEXBERT.items()
                if name in flexbert and flexbert[name] != value]
    problems += [f"{name}={flexbert[name]} but the tensors say {value}"
                 for name, value in sizes.items() if name in flexbert and flexbert[name] != value]
    if "num_attention_heads" not in flexbert:
        problems.append("num_attention_heads is missing")
    elif sizes["hidden_size"] % flexbert["num_attention_heads"]:
        problems.append(f"num_attention_heads={flexbert['num_attention_heads']} does not divide "
                        f"hidden_size={sizes['hidden_size']}")
    else:
        head_dim = sizes["hidden_size"] // flexbert["num_attention_heads"]
        if flexbert.get("rotary_emb_dim") not in (None, head_dim):
            problems.append(f"rotary_emb_dim={flexbert['rotary_emb_dim']} (ettin rotates the whole "
                            f"head, {head_dim})")
    if problems:
        raise ComposerLoadError("the checkpoint's FlexBERT config is not a ModernBERT/Ettin model "
                                "ettin can run: " + "; ".join(problems))


def _heads_from_sizes(sizes: dict, notes: list[str]) -> int:
    shape = {k: sizes[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size")}
    for name, row in SIZES.items():
        if all(row.shape()[k] == v for k, v in shape.items()):
            notes.append(f"attention heads from the {name} row of SIZES")
            return row.num_attention_heads
    if sizes["hidden_size"] % 64:
        raise ComposerLoadError(f"cannot tell the number of attention heads of hidden size "
                                f"{sizes['hidden_size']}: the checkpoint has no FlexBERT config")
    notes.append("attention heads assumed from Ettin's head size 64 (no FlexBERT config, no SIZES row)")
    return sizes["hidden_size"] // 64


# ---------------------------------------------------------------------------------------------------
# Optimizer


def convert_optimizer_state(optimizers: Any, flexbert_state: dict, renamed: dict[str, str],
                            reference: ModernBert) -> tuple[Optional[dict], str]:
    """optimi StableAdamW's state (fully decoupled weight decay, bert24's [no-decay, decay] groups)
    as a state dict for ettin's StableAdamW(param_groups(model, ...)), or (None, why not).

    The two optimizers keep the same per-parameter moments (already bias-corrected EMAs) and one
    step counter per group, and split the groups by the same rule, so the mapping is exact when the
    groups hold the same parameters. Anything else is refused rather than approximated."""
    if not optimizers:
        return None, "the checkpoint holds no optimizer state"
    if not isinstance(optimizers, dict) or len(optimizers) != 1:
        return None, "expected exactly one optimizer in state['optimizers']"
    (name, saved), = optimizers.items()
    if name != "StableAdamW":
        return None, f"the optimizer is {name}, whose moments differ from ettin's StableAdamW"
    groups = saved.get("param_groups") or []
    names_per_group = _group_names(groups, flexbert_state, renamed)
    if names_per_group is None:
        return None, "cannot name the parameters of the saved optimizer groups"
    expected = reference.state_dict()
    ours_state: dict[int, dict] = {}
    ours_groups = []
    for our_names in param_group_names(reference):
        match = [i for i, names in enumerate(names_per_group) if set(names) == set(our_names)]
        if not match:
            return None, ("the saved parameter groups do not hold the same parameters as ettin's "
                          "[no decay on norms and biases, decay on the rest] (filter_bias_norm_wd off?)")
        group = groups[match[0]]
        by_name = dict(zip(names_per_group[match[0]], group["params"]))
        if not group.get("decouple_lr", False) or group.get("max_lr") is None or "step" not in group:
            return None, "the saved StableAdamW did not use fully decoupled weight decay (decouple_lr)"
        ids = []
        for param_name in our_names:
            moments = saved.get("state", {}).get(by_name[param_name])
            if not isinstance(moments, dict) or moments.get("kahan_comp") is not None or any(
                    moments.get(k) is None or moments[k].shape != expected[param_name].shape
                    for k in ("exp_avg", "exp_avg_sq")):
                return None, (f"the state of {param_name} is missing, has other shapes or holds a "
                              "Kahan compensation (low-precision weights), which ettin does not keep")
            ids.append(len(ours_state))
            ours_state[ids[-1]] = {"exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]}
        betas = group["betas"] if "betas" in group else (group["beta1"], group["beta2"])
        ours_groups.append(dict(
            params=ids, lr=float(group["lr"]), betas=tuple(float(b) for b in betas),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            max_lr=float(group["max_lr"]), step=int(group["step"]),
        ))
    return {"state": ours_state, "param_groups": ours_groups}, ""


def _group_names(groups: list, flexbert_state: dict, renamed: dict[str, str]) -> Optional[list[list[str]]]:
    """Our parameter names of each saved group. Multi-GPU checkpoints name the parameters (torch's
    get_optimizer_state_dict); single-process ones number them in group order, each group in the
    model's parameter order, which is the state dict's order without the tied decoder.weight."""
    ids = [group.get("params", []) for group in groups]
    if all(isinstance(i, str) for group in ids for i in group):
        return [[flexbert_key_to_ours(i) for i in group] for group in ids]
    if not all(isinstance(i, int) for group in ids for i in group):
        return None
    ndim = {renamed[k]: t.ndim for k, t in flexbert_state.items()
            if renamed[k] != "decoder.weight" and not renamed[k].endswith(".inv_freq")}
    in_order = list(ndim)
    if len(groups) == 1:
        candidates = [in_order]
    elif len(groups) == 2 and groups[0].get("weight_decay") == 0:
        # bert24's param_groups_weight_decay: [ndim <= 1 or *.bias, everything else]
        no_decay = [n for n in in_order if ndim[n] <= 1 or n.endswith(".bias")]
        candidates = [no_decay, [n for n in in_order if n not in no_decay]]
    else:
        return None
    if [len(g) for g in ids] != [len(c) for c in candidates]:
        return None
    return candidates

