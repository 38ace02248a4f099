"""The suite report: every member's score on the same tasks against its parameter count, in the
paper's four series (encoders, decoders, encoder-from-decoder, decoder-from-encoder), per task and per
category average, and the data-identity checks of each size's members.

    write_suite_report(SUITE_DIR, members, eval_files)  ->  SUITE_DIR/report/{suite.csv, report.md,
                                                            report.html, ladder.png}

The Ettin paper's scores (ettin/evaluation/paper_scores.json) are drawn beside the native members of
Ettin's sizes wherever the paper reports the same task.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from ettin.evaluation.paper import paper_entry
from ettin.model.config import size_row
from ettin.report import identity, plots, runs, scores
from ettin.report.render import SMOKE_WARNING, image, render_html, render_markdown
from ettin.store.fs import write_text

COLUMNS = ["member", "size", "parameters", "objective", "origin", "series", "task", "category",
           "metric", "score", "direction"]
# A member's series: its kind (from its objective) and whether it was trained natively.
SERIES = {("encoder", "native"): "encoders", ("decoder", "native"): "decoders",
          ("encoder", "cross"): "encoder-from-decoder", ("decoder", "cross"): "decoder-from-encoder"}


def suite_table(members: Sequence[dict], evaluation: dict) -> pd.DataFrame:
    """One row per member x task. Parameters: the size table's published count, else the count of
    the evaluated model (smoke sizes)."""
    rows = []
    for member in members:
        result = evaluation["models"].get(member["name"])
        if result is None:
            raise runs.RunError(f"the evaluation has no results for member {member['name']}; "
                                "evaluate it (python -m ettin.suite ... evaluates every member)")
        parameters = size_row(member["size"]).parameters or result.get("parameters")
        series = SERIES[(result["kind"], member["origin"])]
        for task, score in sorted(result["tasks"].items()):
            rows.append([member["name"], member["size"], parameters, result["objective"],
                         member["origin"], series, task, score["category"], score["metric"],
                         score["score"], "higher" if score["higher_is_better"] else "lower"])
    return pd.DataFrame(rows, columns=COLUMNS)


def category_averages(table: pd.DataFrame) -> pd.DataFrame:
    """Each member's mean score per task category (the rows a 'task' of the ladder plot)."""
    averaged = (table.groupby(["member", "size", "parameters", "objective", "origin", "series",
                               "category", "direction"], as_index=False)["score"].mean())
    averaged["task"] = "average: " + averaged["category"]
    averaged["metric"] = "mean score"
    return averaged[COLUMNS]


PAPER_COLUMNS = ["series", "size", "parameters", "task", "score", "source"]
KIND_OF_SERIES = {"encoders": "encoder", "decoders": "decoder"}  # the series the paper's tables report


def paper_points(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's score for each native member's size and each task the suite scored, on our scale
    (the paper's percentages / 100), with its citation; empty for sizes the paper does not have."""
    rows = []
    natives = table[table["series"].isin(list(KIND_OF_SERIES))]
    for (series, size, parameters), scored in natives.groupby(["series", "size", "parameters"]):
        published = paper_entry(KIND_OF_SERIES[series], size) or {}
        for task in sorted(set(scored["task"]) & set(published)):
            percent, source = published[task]
            rows.append([series, size, parameters, task, percent / 100,
                         f"arXiv {source['arxiv']} {source['version']}, {source['table']}"])
    return pd.DataFrame(rows, columns=PAPER_COLUMNS)


# What must agree between members of different sizes (their batch, LR and shape may differ).
ACROSS_SIZES = ("data sources (path, weight)", "prepared data fingerprint")


def identity_table(directory: Path, members: Sequence[dict]) -> pd.DataFrame:
    """Per size, the native pair and the cross pair compared check by check (same data, same order,
    same schedule); across sizes, each size's first member against the first size's (same data)."""
    frames = []
    by_name = {m["name"]: m for m in members}
    sizes = list(dict.fromkeys(m["size"] for m in members))

    def compare(names: Sequence[str], label: str, only: Sequence[str] = ()) -> None:
        a, b = (runs.load_run(directory / n) for n in names)
        checks = identity.identity_checks(a, b)
        table = identity.checks_table([c for c in checks if not only or c.name in only])
        table.insert(0, "members", f"{names[0]} vs {names[1]}")
        table.insert(0, "size", label)
        frames.append(table)

    for size in sizes:
        for pair in (("encoder", "decoder"), ("encoder_from_decoder", "decoder_from_encoder")):
            names = [f"{role}_{size}" for role in pair]
            if all(n in by_name for n in names):
                compare(names, size)
    firsts = [next(m["name"] for m in members if m["size"] == size) for size in sizes]
    for other in firsts[1:]:
        compare([firsts[0], other], "across sizes", ACROSS_SIZES)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_suite_report(directory: Path | str, members: Sequence[dict],
                       eval_files: Sequence[Path | str]) -> Path:
    """suite.csv, report.md, report.html and the ladder plot in ``directory/report``; returns report.md."""
    directory = Path(directory)
    out = directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    evaluation, weights, refused = scores.current_scores(
        scores.load_evaluation(*eval_files), [runs.load_run(directory / m["name"]) for m in members])
    table = suite_table(members, evaluation)
    write_text(out / "suite.csv", table.to_csv(index=False))
    ladder = pd.concat([table, category_averages(table)], ignore_index=True)
    paper = paper_points(table)
    checks = identity_table(directory, members)
    differs = int((checks["status"] == identity.DIFFERS).sum()) if len(checks) else 0
    title = f"ettin suite report: {directory.resolve().name}"
    blocks: list[tuple] = [
        ("h1", title),
        ("p", f"{len(members)} members of {directory.resolve()}, evaluated on the suite "
              f"{evaluation.get('suite')!r}. Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."),
    ]
    if refused:
        blocks.append(("p", scores.refused_warning(refused, f"python -m ettin.suite (the command that made "
                                                            f"{directory}) evaluates every member again")))
    if scores.is_smoke(evaluation):
        blocks.append(("p", f"WARNING: {SMOKE_WARNING}"))
    blocks += [
        ("h2", "Evaluated weights"),
        ("p", "The checkpoint each member's scores were computed from (eval.json's provenance), against "
              "the member's latest checkpoint."),
        ("table", weights),
        ("h2", "Scores against parameters"),
        ("p", "Per task and per category average, each series' score against the parameter count "
              "(log axis): encoders, decoders, encoder-from-decoder, decoder-from-encoder."),
        image(plots.plot_ladder(ladder, paper), out, "ladder.png", "scores against parameters"),
        ("table", ladder.pivot_table(index=["task", "metric", "direction"],
                                     columns=["series", "size"], values="score")
         .round(4).reset_index().pipe(_flat_columns)),
        *_paper_blocks(table, paper),
        ("h2", "Data and schedule identity across members"),
        ("p", f"{len(checks)} checks, {differs} differ. Each size's encoder and decoder (and its two "
              "cross members) must have seen the same data in the same order under the same "
              "schedule; every size must have trained on the same data."),
        ("table", checks),
    ]
    write_text(out / "report.md", render_markdown(blocks))
    write_text(out / "report.html", render_html(blocks, out, title=title))
    return out / "report.md"


def _paper_blocks(table: pd.DataFrame, paper: pd.DataFrame) -> list[tuple]:
    """Ours beside the paper's where both exist (hollow points in the plot)."""
    if paper.empty:
        return [("p", "The Ettin paper reports none of these tasks at these sizes (its scores are "
                      "drawn where a member has an Ettin size and the paper reports the task).")]
    ours = table[["series", "size", "task", "score"]].rename(columns={"score": "ours"})
    both = paper.rename(columns={"score": "paper"}).merge(ours, on=["series", "size", "task"])
    both["ours - paper"] = both["ours"] - both["paper"]
    return [("h2", "Beside the Ettin paper"),
            ("table", both[["series", "size", "task", "ours", "paper", "ours - paper", "source"]].round(4))]


def _flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    table.columns = [" ".join(str(p) for p in c if p) if isinstance(c, tuple) else c
                     for c in table.columns]
    return table
