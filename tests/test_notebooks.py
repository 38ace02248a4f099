"""notebooks/ run top to bottom on a smoke pair trained here, and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ettin.train_command import main

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# The smoke recipe in short phases, with a validation point inside each phase and checkpoints
# inside the first (about 20 s of training per model on 2 CPUs).
SHORT = [
    "phases.pretrain.tokens=20_000", "phases.pretrain.checkpoint_every_tokens=10_000",
    "phases.extension.tokens=6_000", "phases.decay.tokens=4_000",
    "phases.pretrain.val_every_tokens=10_000", "phases.extension.val_every_tokens=3_000",
    "phases.decay.val_every_tokens=2_000",
    "trainer.log_every_steps=1", "trainer.num_workers=0", "eval_at_end=false",
]


@pytest.fixture(scope="module")
def smoke_pair(tmp_path_factory) -> tuple[Path, Path]:
    """An encoder and a decoder trained on the same data and schedule, each exported."""
    root = tmp_path_factory.mktemp("notebook-runs")
    assert main([f"output_dir={root / 'runs'}", f"data_dir={root / 'data'}", "run_name=nb", *SHORT]) == 0
    runs = [root / "runs" / "nb-encoder", root / "runs" / "nb-decoder"]
    scores = {"nli": ("classification", 0.5, 0.4), "cloze": ("generation", 0.3, 0.35)}
    evaluation = {"format": "ettin-eval/1", "suite": "offline", "created": "2026-01-01T00:00:00",
                  "models": {run.name: {"path": str(run / "hf"), "kind": side, "objective": None,
                                        "parameters": 1, "tasks": {
                                            task: {"category": c, "metric": "accuracy",
                                                   "score": s[index], "stderr": 0.05, "higher_is_better": True,
                                                   "smoke": True, "n_examples": 10, "library": "test"}
                                            for task, (c, *s) in scores.items()}}
                             for index, (run, side) in enumerate(zip(runs, ("encoder", "decoder")))}}
    for run in runs:  # and every checkpoint, as python -m ettin.eval RUN --checkpoints all names them
        for checkpoint in sorted((run / "checkpoints").iterdir()):
            evaluation["models"][f"{run.name}@{checkpoint.name}"] = evaluation["models"][run.name]
    (root / "eval.json").write_text(json.dumps(evaluation))
    return runs[0], runs[1]


def execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    # The kernel inherits this process's environment: the parameters cell reads the runs from it.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    return [o["data"][kind] for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.outputs if kind in o.get("data", {})]


def test_the_notebooks_are_committed_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"pair_report.ipynb", "checkpoint_analysis.ipynb"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert all(c.outputs == [] and c.execution_count is None for c in code), path.name
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and code.index(tagged[0]) == 0, f"{path.name}: one parameters cell, first"


@pytest.mark.slow
def test_pair_report_notebook_runs_on_the_smoke_pair(smoke_pair, monkeypatch):
    encoder, decoder = smoke_pair
    monkeypatch.setenv("ETTIN_RUN_A", str(encoder))
    monkeypatch.setenv("ETTIN_RUN_B", str(decoder))
    monkeypatch.setenv("ETTIN_EVAL", str(encoder.parent.parent / "eval.json"))
    notebook = execute("pair_report.ipynb")
    assert len(outputs(notebook, "image/png")) == 6  # loss, schedule, throughput, scores, nli and cloze over training
    tables = "\n".join(outputs(notebook, "text/html"))
    assert "sample order" in tables and ">differs<" not in tables and "nb-decoder" in tables


@pytest.mark.slow
@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_checkpoint_analysis_notebook_runs_on_each_model(smoke_pair, side, monkeypatch):
    run = smoke_pair[0] if side == "encoder" else smoke_pair[1]
    monkeypatch.setenv("ETTIN_RUN", str(run))
    notebook = execute("checkpoint_analysis.ipynb")
    printed = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.outputs)
    assert "max |logit difference|, transformers vs ettin" in printed
    assert len(outputs(notebook, "image/png")) == 1
