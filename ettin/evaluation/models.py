"""What ``python -m ettin.eval MODEL`` accepts: a Hugging Face ModernBERT / ModernBERT-Decoder folder
or hub id (ours, exported, or saved by plain transformers), or an ettin run directory (its export
``RUN/hf``, made from the latest checkpoint when missing).

A model trained with attention no transformers class computes (``objective=prefix_lm``) is read as
trained: lm-eval's tasks through ``ettin-prefix`` (the context as its prefix), and the fine-tuned tasks
(classification, retrieval) with the whole input as the prefix, which is bidirectional attention: its
run is exported for evaluation as an encoder, to ``RUN/hf-bidirectional``, whatever its ``export_as``
(``RUN/hf`` stays what the run's ``export_as`` chose, or absent). A prefix LM's folder given directly is
fine-tuned as the class it loads as."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ettin.model.hub import DECODER_TYPE, ENCODER_TYPE
from ettin.store.rundir import RunDir

log = logging.getLogger("ettin")


class EvalError(ValueError):
    """A model or task that cannot be evaluated; the message names the problem and the fix."""


@dataclass(frozen=True)
class EvalModel:
    name: str
    path: Path  # the Hugging Face folder
    kind: str  # "encoder" | "decoder" | "prefix" (a prefix LM, in a folder of either class)
    objective: Optional[str]  # "mlm" | "clm" | "mntp", None for folders not made by ettin
    parameters: int
    ettin_size: Optional[str] = None  # the Ettin size it has (released hub id, or the shape of a size)
    # the checkpoint the folder was exported from (its run and checkpoint_identity), None if not ettin's
    checkpoint: Optional[dict] = None
    # the class the folder loads as ("encoder" | "decoder"), where it differs from kind (a prefix LM)
    folder_kind: Optional[str] = None

    @property
    def is_decoder(self) -> bool:
        """Whether the folder is a decoder: fine-tuned tasks read it with a decoder's template and pooling."""
        return (self.folder_kind or self.kind) == "decoder"


def exported_as(checkpoint: Path) -> Optional[str]:
    """The side an evaluation exports ``checkpoint`` as: None for its own class (its objective's, or the
    run's ``export_as`` for a mix); ``encoder`` for an objective no class computes, whatever the run's
    ``export_as`` (a prefix LM: its whole input as the prefix is bidirectional attention)."""
    from ettin.store.checkpoints import read_meta

    return "encoder" if is_prefix_lm(read_meta(checkpoint).get("objective")) else None


def is_prefix_lm(objective: Optional[str]) -> bool:
    from ettin.objectives import OBJECTIVES, Attention

    return objective in OBJECTIVES and OBJECTIVES[objective].attention is Attention.PREFIX


def _run_objective(run: Path) -> Optional[str]:
    from ettin.store.checkpoints import latest_checkpoint, read_meta

    checkpoint = latest_checkpoint(run)
    return None if checkpoint is None else read_meta(checkpoint).get("objective")


def _parameters(folder: Path) -> int:
    from ettin.model.hub import read_weights

    return sum(t.numel() for k, t in read_weights(folder).items() if not k.startswith("classifier."))


def split_revision(spec: str | Path) -> tuple[str, Optional[str]]:
    """``MODEL@REVISION`` (a hub id at a branch, tag or commit, e.g. ``step599525``) -> (MODEL, REVISION);
    a local path is never split."""
    text = str(spec)
    if "@" not in text or Path(text).exists():
        return text, None
    name, revision = text.rsplit("@", 1)
    return name, revision


def resolve_model(spec: str | Path) -> EvalModel:
    from ettin.model.hub import resolve_folder

    hub_id, revision = split_revision(spec)
    path = Path(spec)
    run: Optional[Path] = None
    if path.is_dir() and RunDir.is_run(path):
        run, latest = path, RunDir(path).latest_checkpoint()
        exported = exported_as(latest) if latest is not None else None
        path = RunDir(run).export() if exported is None else RunDir(run).bidirectional_export()
        if latest is not None:
            export_current(latest, path)
    elif path.is_dir() and RunDir.of_export(path) is not None:
        run = RunDir.of_export(path).path  # RUN/hf or RUN/hf-<phase>
    else:
        path = resolve_folder(hub_id, revision=revision)  # a local folder, or a hub id (cached, or fetched)
    config_file = path / "config.json"
    if not config_file.exists():
        raise EvalError(f"{spec}: {path} has no config.json; give a Hugging Face model folder, a hub id "
                        "or an ettin run directory")
    config = json.loads(config_file.read_text())
    kinds = {ENCODER_TYPE: "encoder", DECODER_TYPE: "decoder"}
    if config.get("model_type") not in kinds:
        raise EvalError(f"{spec}: model_type {config.get('model_type')!r} is not ModernBERT; ettin.eval "
                        f"evaluates {ENCODER_TYPE!r} (encoders) and {DECODER_TYPE!r} (decoders)")
    objective = config.get("ettin_objective") or (_run_objective(run) if run else None)
    name = run.name if run else (path.name if Path(spec).is_dir() else str(spec))
    from ettin.model.export import export_source

    folder_kind = kinds[config["model_type"]]
    return EvalModel(name=name, path=path, kind="prefix" if is_prefix_lm(objective) else folder_kind,
                     objective=objective, parameters=_parameters(path), ettin_size=ettin_size(hub_id, config),
                     checkpoint=export_source(path), folder_kind=folder_kind)


def export_current(checkpoint: Path, folder: Path) -> None:
    """Export ``checkpoint`` to ``folder`` (as ``exported_as`` says) unless ``folder`` already holds its
    export: an export of another checkpoint (the run trained on, or was trained again) or of unknown
    origin is replaced."""
    from ettin.model.export import export_checkpoint, export_source
    from ettin.store.checkpoints import checkpoint_identity

    if (folder / "config.json").exists():
        source = export_source(folder)
        wanted = checkpoint_identity(checkpoint)
        if source is not None and {k: source.get(k) for k in wanted} == wanted:
            return
        log.info("%s was exported from %s, not from %s: exporting again", folder,
                 (source or {}).get("name", "an unrecorded checkpoint"), checkpoint.name)
    else:
        log.info("exporting %s to %s", checkpoint, folder)
    export_checkpoint(checkpoint, folder, export_as=exported_as(checkpoint))


def select_checkpoints(run: Path, selection: str) -> list[Path]:
    """A run's checkpoints, oldest first: ``all``; ``every:K`` (the first, then every K-th, and the last);
    or a comma-separated list of checkpoint names."""
    import difflib

    from ettin.store.checkpoints import list_checkpoints

    found = list_checkpoints(run)
    if not found:
        raise EvalError(f"{run}: no complete checkpoint under {RunDir(run).checkpoints}; --checkpoints needs a run "
                        "directory with checkpoints")
    if selection == "all":
        return found
    if selection.startswith("every:"):
        step = selection.split(":", 1)[1]
        if not step.isdigit() or int(step) < 1:
            raise EvalError(f"--checkpoints {selection}: K must be a whole number >= 1 (every:K)")
        chosen = found[::int(step)]
        return chosen if chosen[-1] == found[-1] else [*chosen, found[-1]]
    by_name = {path.name: path for path in found}
    for name in selection.split(","):
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            raise EvalError(f"{run}: no checkpoint {name!r}{f'; did you mean {close[0]}?' if close else ''} "
                            f"(its checkpoints: {', '.join(by_name)}; or use all, every:K)")
    return [by_name[name] for name in selection.split(",")]


def resolve_checkpoints(run: Path, selection: str) -> list[EvalModel]:
    """One model per selected checkpoint of ``run``, named ``RUN@CHECKPOINT``, each exported once to
    ``RUN/hf-checkpoints/CHECKPOINT``."""
    from dataclasses import replace

    from ettin.store.checkpoints import read_meta

    if not RunDir.is_run(run):
        raise EvalError(f"--checkpoints: {run} is not an ettin run directory (no checkpoints/ folder)")
    models = []
    for checkpoint in select_checkpoints(run, selection):
        folder = RunDir(run).checkpoint_export(checkpoint.name)
        export_current(checkpoint, folder)
        model = resolve_model(folder)
        models.append(replace(model, name=f"{run.name}@{checkpoint.name}",
                              objective=read_meta(checkpoint).get("objective") or model.objective))
    return models


def resolve_models(specs: list[str | Path], checkpoints: Optional[str] = None) -> list[EvalModel]:
    """The models of ``specs``; with ``checkpoints``, every spec is a run directory and gives one model per
    selected checkpoint (``select_checkpoints``)."""
    models = ([m for spec in specs for m in resolve_checkpoints(Path(spec), checkpoints)] if checkpoints
              else [resolve_model(spec) for spec in specs])
    names = [m.name for m in models]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise EvalError(f"two models are both called {duplicated[0]!r} (the run or folder name names a "
                        "model in eval.json); rename one folder, or evaluate them separately")
    return models


# A released Ettin model's hub id names its kind and size.
RELEASED = re.compile(r"^jhu-clsp/ettin-(?P<kind>encoder|decoder)-(?P<size>17m|32m|68m|150m|400m|1b)$")


def ettin_size(spec: str, config: dict) -> Optional[str]:
    """The Ettin size of a model: from a released hub id, else from its shape (layers, hidden,
    intermediate, heads) in ettin.model.config.SIZES; None when it has none."""
    released = RELEASED.match(spec.split("@")[0])
    if released:
        return released["size"]
    from ettin.model.config import SIZES

    shape = {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                         "num_attention_heads")}
    return next((name for name, row in SIZES.items() if name != "tiny" and row.shape() == shape), None)
