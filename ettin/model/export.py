"""Export a run or checkpoint as a Hugging Face folder that plain transformers loads, and prove it.

    python -m ettin.export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--push-to-hub REPO]
        [--allow-theta-mismatch] [--overwrite]

Writes ``model.safetensors`` and ``config.json`` (ettin.model.hub), the tokenizer with the objective's
template (encoder ``[CLS] text [SEP]``, decoder ``[CLS] text``), ``generation_config.json`` for
decoders and a model card; then reloads the folder with transformers (ModernBertForMaskedLM or
ModernBertDecoderForCausalLM) and fails if its logits differ from ours. The folder appears complete or
not at all: it is written aside and renamed into place. An existing OUT_DIR is replaced only if it is
empty or an earlier ettin export (or with ``--overwrite``): a folder of other files is never deleted.

The class comes from the objective registry alone (``Objective.export_class``: the objective's side, or
the run's ``export_as``). A model trained with attention neither class computes (prefix_lm) is refused,
naming the choices, unless the run chose ``export_as=encoder|decoder``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from ettin.store.checkpoints import META, checkpoint_identity, load_weights, read_meta
from ettin.store.fs import publish
from ettin.store.rundir import RunDir
from ettin.model.config import ModelConfig
from ettin.model.hub import save_hf, transformers_major
from ettin.model.modernbert import ModernBert
from ettin.objectives import OBJECTIVES, SIDES, ExportRefused

log = logging.getLogger("ettin")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Reloaded logits vs ours, fp32 on CPU: only the order of float operations differs.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
# Which checkpoint an export was made from (the run's name and ``checkpoint_identity``): evaluation
# records it with every score, and re-exports a run whose export is not of its latest checkpoint.
SOURCE = "ettin_source.json"


class ExportError(RuntimeError):
    """The export cannot be made, or transformers does not reproduce our model from it."""


def resolve_checkpoint(source: Path | str) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(source)
    if (path / META).exists():
        return path
    if RunDir.is_run(path):
        found = RunDir(path).latest_checkpoint()
        if found is not None:
            return found
        raise ExportError(f"run {path} has no complete checkpoint yet; nothing to export")
    raise ExportError(f"{path} is neither an ettin run folder nor a checkpoint folder (no meta.json); "
                      "give runs/<run name> or runs/<run name>/checkpoints/<checkpoint>")


def export_class(meta: dict) -> str:
    """The transformers class a checkpoint exports as: its objective's (registry), or the run's
    ``export_as``; ExportError where none computes what the model was trained to."""
    try:
        return OBJECTIVES[meta["objective"]].export_class(meta.get("export_as"))
    except ExportRefused as error:
        raise ExportError(str(error)) from None


def load_checkpoint_model(checkpoint: Path, causal: Optional[bool] = None) -> tuple[ModernBert, dict]:
    """Our model from a checkpoint, ready for inference (sdpa, no dropout), and its meta; ``causal``:
    its default direction (None: its objective's)."""
    meta = read_meta(checkpoint)
    causal = OBJECTIVES[meta["objective"]].causal if causal is None else causal
    config = ModelConfig(**{**meta["model_config"], "attn_implementation": "sdpa",
                            "attention_output_dropout": 0.0, "attention_dropout": 0.0,
                            "embedding_dropout": 0.0, "mlp_dropout": 0.0, "causal": causal})
    model = ModernBert(config)
    model.load_state_dict(load_weights(checkpoint))
    return model.eval(), meta


def export_source(folder: Path | str) -> Optional[dict]:
    """The checkpoint ``folder`` was exported from (``SOURCE``), or None (not an ettin export, or one
    made before ettin recorded it)."""
    try:
        return json.loads((Path(folder) / SOURCE).read_text())
    except (OSError, ValueError):
        return None


def is_ettin_export(folder: Path) -> bool:
    """Whether ``folder`` was written by this exporter: its config.json names the ettin objective
    (or, for exports made before that key, its model card says it was trained with ettin)."""
    config, card = folder / "config.json", folder / "README.md"
    try:
        if "ettin_objective" in json.loads(config.read_text()):
            return True
    except (OSError, ValueError):
        pass
    try:
        return "\nTrained with ettin" in card.read_text()
    except OSError:
        return False


def check_replaceable(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; give a folder path to export into")
    if overwrite or not out.exists() or not any(out.iterdir()) or is_ettin_export(out):
        return
    raise ExportError(f"{out} is not empty and is not an ettin export; exporting would delete its "
                      "files. Choose another folder, or pass --overwrite (overwrite=True) to replace it")


def export_checkpoint(source: Path | str, out_dir: Path | str, *, dtype: str = "fp32",
                      push_to_hub: Optional[str] = None, allow_theta_mismatch: bool = False,
                      overwrite: bool = False, export_as: Optional[str] = None) -> Path:
    """``export_as`` (``encoder`` | ``decoder``): the class to export as in place of the run's choice
    (ettin.evaluation exports a prefix LM as an encoder: its whole input as the prefix)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out_dir)
    check_replaceable(out, overwrite)
    checkpoint = resolve_checkpoint(source)
    chosen = {"export_as": export_as} if export_as else {}
    cls = export_class({**read_meta(checkpoint), **chosen})  # refused before anything is written
    model, meta = load_checkpoint_model(checkpoint, causal=cls == SIDES["decoder"])
    meta = {**meta, **chosen}
    # Beside the export, visible: a failed check leaves it for inspection and the previous export
    # untouched.
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_export(model, meta, checkpoint, partial, dtype=dtype, allow_theta_mismatch=allow_theta_mismatch)
    publish(partial, out)
    if push_to_hub:
        push(out, push_to_hub)
    return out


def write_export(model: ModernBert, meta: dict, checkpoint: Path, partial: Path, *, dtype: str,
                 allow_theta_mismatch: bool) -> None:
    """The export's files in ``partial``, checked against our model by reloading them. ``model``'s
    direction (``config.causal``) is the export class's (``load_checkpoint_model``)."""
    causal = model.config.causal
    save_hf(model, partial, causal=causal, dtype=DTYPES[dtype], allow_theta_mismatch=allow_theta_mismatch,
            objective=meta["objective"])
    tokenizer = export_tokenizer(meta["tokenizer"], partial, causal=causal)
    if causal:
        from transformers import GenerationConfig

        c = model.config
        # No length here: a max_new_tokens in the file overrides a caller's max_length (lm-eval).
        GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                         pad_token_id=c.pad_token_id).save_pretrained(partial)
    (partial / "README.md").write_text(model_card(model, meta, checkpoint, dtype))
    (partial / SOURCE).write_text(json.dumps({"run": meta.get("run_name"), **checkpoint_identity(checkpoint)},
                                             indent=2) + "\n")
    if causal and model.config.local_rope_theta != model.config.global_rope_theta and transformers_major() < 5:
        # Only transformers >= 5 applies a decoder's local theta: 4.x cannot verify this export.
        log.warning("not checked: transformers %d.x applies one rope theta to every decoder layer; "
                    "verify this export with transformers >= 5", transformers_major())
    else:
        difference = check_parity(partial, model, tokenizer, DTYPES[dtype])
        log.info("transformers reproduces the export: max |logit difference| %.2e", difference)


def export_tokenizer(tokenizer_path: str, out: Path, *, causal: bool):
    from ettin.data.tokenizer import load_tokenizer, set_objective_template

    tokenizer = load_tokenizer(tokenizer_path)
    set_objective_template(tokenizer, causal=causal)
    if causal:  # batched generation continues each row from its last token: pad on the left
        tokenizer.padding_side = "left"
        tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config
    tokenizer.save_pretrained(str(out))
    return tokenizer


def check_parity(folder: Path, model: ModernBert, tokenizer, dtype: torch.dtype) -> float:
    """Reload ``folder`` with transformers and compare its logits with ours on real text. For a bf16
    export both sides compute in fp32 from the same bf16-rounded weights, so the check is exact about
    the file, not about bf16 arithmetic."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    loader = AutoModelForCausalLM if model.config.causal else AutoModelForMaskedLM
    reloaded = loader.from_pretrained(str(folder), attn_implementation="eager",
                                      dtype=torch.float32).eval()
    ours = model
    if dtype != torch.float32:
        ours = ModernBert(model.config).eval()
        ours.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "A short one.", "x"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        theirs = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mine = ours(batch["input_ids"], batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()  # padded positions are garbage in transformers: skip them
    difference = (theirs[real] - mine[real]).abs()
    tolerance = PARITY_ATOL + PARITY_RTOL * mine[real].abs()
    if not torch.isfinite(theirs[real]).all() or (difference > tolerance).any():
        raise ExportError(
            f"transformers does not reproduce the exported model: max |logit difference| "
            f"{difference.max():.3e} (tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g}|logit|). The folder "
            f"was left at {folder} for inspection; please report this with its config.json."
        )
    return float(difference.max())


# transformers' module names (peft's target_modules) of the attention and MLP projections.
LORA_TARGETS = {False: ["Wqkv", "Wo", "Wi"], True: ["q_proj", "k_proj", "v_proj", "Wo", "Wi"]}


def model_card(model: ModernBert, meta: dict, checkpoint: Path, dtype: str) -> str:
    causal = model.config.causal
    kind = "decoder (causal LM)" if causal else "encoder (masked LM)"
    cls = SIDES["decoder" if causal else "encoder"]
    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    lm_eval_model = "hf" if causal else "ettin-mlm"
    lm_eval_import = "" if causal else "import ettin.evaluation  # registers the ettin-mlm model type\n"
    c = model.config
    mntp = meta["objective"] == "mntp"
    trained = OBJECTIVES[meta["objective"]].attention
    prefix_note = f"""
**Attention differs from training:** this model was trained with objective `{meta['objective']}`
({trained.value} attention: bidirectional over a prefix, causal after it) and exported as `{cls}`
(`export_as={meta.get('export_as')}`), which attends {'causally' if causal else 'bidirectionally'} everywhere:
its outputs are those of {'an empty prefix' if causal else 'a prefix covering the whole input'}, and its
logits predict the next token. `python -m ettin.eval` reads it as trained (lm-eval model `ettin-prefix`:
the context as the prefix).
""" if trained.causal and OBJECTIVES[meta["objective"]].side is None else ""
    mntp_note = """
**Masked next-token prediction (MNTP):** this encoder was trained to predict a masked token at
position j from the output at position j - 1 (LLM2Vec), so `pipeline("fill-mask")`, which reads a
`[MASK]` at j from position j, gives wrong answers. Read the logits one position to the left;
config.json says so (`"ettin_objective": "mntp"`, `"ettin_predicts_next_token": true`), and
`python -m ettin.eval` honours it.
""" if mntp else ""
    return f"""---
library_name: transformers
tags: [ettin, modernbert]
---
# {meta['run_name']}: ModernBERT {kind}

Trained with ettin — recipe `{meta['recipe']}`, objective `{meta['objective']}`,
phase `{meta['phase']}` at {meta['tokens']:,} tokens (step {meta['step']}), git commit `{meta['git_commit']}`.
{model.num_parameters():,} parameters, {c.num_hidden_layers} layers, hidden size {c.hidden_size},
global attention every {c.global_attn_every_n_layers} layers, sliding window {c.window} tokens
{'before each token' if causal else 'on each side'}, RoPE theta {c.global_rope_theta:g} (global) /
{c.local_rope_theta:g} (local). Weights in {dtype}; exported from `{checkpoint.name}`.
{mntp_note}{prefix_note}
```python
from transformers import AutoTokenizer, {auto}
tokenizer = AutoTokenizer.from_pretrained("PATH")
model = {auto}.from_pretrained("PATH")  # {cls}
```
Also loads with `AutoModelForSequenceClassification` for fine-tuning{
' (the last token is pooled; the tokenizer pads on the left)' if causal else ''}.

LoRA (peft): `target_modules={LORA_TARGETS[causal]}` — every attention and MLP projection
(`Wo` names both the attention output and the MLP output projection).

Sentence embeddings (sentence-transformers builds mean pooling over the last hidden states for a
folder without modules.json):

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("PATH")
```

Evaluation (lm-evaluation-harness{'' if causal else "; ettin registers a masked-LM model type that scores "
"a continuation token by token, each with the current and the next positions masked (Samuel, 2024)"}):

```python
{lm_eval_import}import lm_eval
lm_eval.simple_evaluate(model="{lm_eval_model}", model_args="pretrained=PATH", tasks=["hellaswag"])
```
or `python -m ettin.eval PATH --tasks hellaswag,arc_easy` (`python -m ettin.eval PATH` runs ettin's offline
smoke suite).
"""


def pipeline_example(folder: Path) -> str:
    """A one-line shell command that uses the exported folder (by the class its config.json names)."""
    if json.loads((folder / "config.json").read_text())["model_type"].endswith("decoder"):
        call = f"pipeline('text-generation', model='{folder}')('The module', max_new_tokens=20)"
    else:
        call = f"pipeline('fill-mask', model='{folder}')('The [MASK] module.')"
    return f"python -c \"from transformers import pipeline; print({call})\""


def push(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    log.info("pushed %s to https://huggingface.co/%s", folder, repo_id)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ettin.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (runs/<name>) or one of its checkpoints")
    parser.add_argument("out_dir", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub repo")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR even if it is not empty and not an ettin export")
    parser.add_argument("--allow-theta-mismatch", action="store_true",
                        help="export a decoder whose local and global rope thetas differ (faithful in "
                             "transformers >= 5 only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ettin.model.hub import HubError

    try:
        out = export_checkpoint(args.source, args.out_dir, dtype=args.dtype, push_to_hub=args.push_to_hub,
                                allow_theta_mismatch=args.allow_theta_mismatch, overwrite=args.overwrite)
    except (ExportError, HubError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {out}\ntry: {pipeline_example(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
