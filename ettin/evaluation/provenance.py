"""What a score was computed from: the ``provenance`` of every task result in eval.json, and the rule
for reusing a stored score.

    {"weights_sha256": ...,        # sha256 of the evaluated folder's model.safetensors
     "tokenizer": ...,             # ettin.data.tokenizer.tokenizer_fingerprint of its tokenizer
     "checkpoint": {...} | None,   # the run and checkpoint it was exported from: name, phase, step,
                                   # tokens, the checkpoint's weights_sha256 (None: not an ettin export)
     "task": {...},                # limit, few_shot, seed, split, dataset revisions, fine-tuning settings
     "versions": {...}}            # ettin, torch, transformers and the task's own libraries

A stored score is reused only when its provenance equals the one the rerun would record
(``why_not_reused`` names the first field that differs).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from ettin.evaluation.models import EvalModel
from ettin.evaluation.registry import LM_EVAL, MTEB, SENTENCE_TRANSFORMERS, Task

# The weights files a Hugging Face folder may hold, in the order transformers prefers them.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# The libraries each kind of task runs through (ettin, torch and transformers always).
TASK_LIBRARIES = {LM_EVAL: ("lm_eval",), SENTENCE_TRANSFORMERS: ("sentence-transformers",),
                  MTEB: ("sentence-transformers", "mteb")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> Optional[str]:
    """sha256 of the folder's weights file (``sha256sum model.safetensors``); of several (a sharded
    model), the sha256 of their names and hashes; None when it has none."""
    files = next((sorted(folder.glob(p)) for p in WEIGHT_PATTERNS if list(folder.glob(p))), [])
    if len(files) == 1:
        return _sha256(files[0])
    if not files:
        return None
    return hashlib.sha256("".join(f"{f.name}:{_sha256(f)}\n" for f in files).encode()).hexdigest()


def model_provenance(model: EvalModel) -> dict:
    """The evaluated weights, tokenizer and checkpoint (read once per model per evaluation)."""
    from transformers import AutoTokenizer

    from ettin.data.tokenizer import tokenizer_fingerprint

    return {"weights_sha256": weights_sha256(model.path),
            "tokenizer": tokenizer_fingerprint(AutoTokenizer.from_pretrained(model.path)),
            "checkpoint": model.checkpoint}


def _version(distribution: str) -> Optional[str]:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def library_versions(task: Task) -> dict:
    libraries = ("ettin", "torch", "transformers", *TASK_LIBRARIES.get(task.library, ()),
                 *(("mteb",) if task.mteb_task else ()), *(("datasets",) if task.datasets else ()))
    return {name: _version(name) for name in dict.fromkeys(libraries)}


def task_provenance(task: Task, *, limit: Optional[int], seed: int, learning_rates: Optional[tuple[float, ...]],
                    retrieval_settings) -> dict:
    """The settings that decide the task's score besides the model."""
    settings = {"limit": limit, "few_shot": task.few_shot, "seed": seed, "split": task.split,
                "dataset_revisions": {str(d): d.revision for d in task.datasets}}
    if task.grid is not None:
        settings["learning_rates"] = list(learning_rates or task.grid.learning_rates)
    if task.library == SENTENCE_TRANSFORMERS and not task.mteb_task:
        settings["retrieval"] = asdict(retrieval_settings)
    return settings


def why_not_reused(stored: Optional[dict], wanted: dict) -> Optional[str]:
    """None when a stored task result may stand for ``wanted`` provenance; else why not, in one line."""
    if stored is None:
        return "not evaluated yet"
    recorded = stored.get("provenance")
    if recorded is None:
        return "its provenance is not recorded (scored by an older ettin)"
    return _first_difference(recorded, wanted, "")


def _first_difference(old, new, where: str) -> Optional[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in dict.fromkeys([*new, *old]):
            found = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    if old == new:
        return None
    return f"{where} changed ({_short(old)} -> {_short(new)})"


def _short(value) -> str:
    text = "none" if value is None else str(value)
    return text[:12] if len(text) >= 32 and all(c in "0123456789abcdef" for c in text) else text


def short_hash(value: Optional[str]) -> str:
    return value[:12] if value else "not recorded"
