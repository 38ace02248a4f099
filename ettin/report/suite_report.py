"""The suite report: every member's score on the same tasks against its parameter count, in the
paper's four series (encoders, decoders, encoder-from-decoder, decoder-from-encoder) and, where the suite
trained one (objectives=[mlm,clm,mdlm]), the masked diffusion series, per task and per category
average, and the data-identity checks of each size's members.

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

from ettin.store.members import BASE, member_name
from ettin.evaluation.paper import paper_entry
from ettin.model.config import size_row
from ettin.report import identity, plots, runs, scores
from ettin.report.render import SMOKE_WARNING, image, render_html, render_markdown
from ettin.store.fs import write_text

COLUMNS = ["member", "size", "parameters", "objective", "origin", "series", "task", "category",
           "metric", "score", "direction", "stderr", "ci95_low", "ci95_high", "stderr_method", "seed"]
# A member's series, by its role (ettin.cluster.suite_members.OBJECTIVE_OF_ROLE): a diffusion member is an encoder to
# transformers, so its kind alone would put it among the encoders.
SERIES = {"encoder": "encoders", "decoder": "decoders", "diffusion": "masked diffusion",
          "encoder_from_decoder": "encoder-from-decoder", "decoder_from_encoder": "decoder-from-encoder"}


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
        series = SERIES[member["role"]]
        for task, score in sorted(result["tasks"].items()):
            low, high = score.get("ci95") or (None, None)
            rows.append([member["name"], member["size"], parameters, result["objective"],
                         member["origin"], series, task, score["category"], score["metric"],
                         score["score"], "higher" if score["higher_is_better"] else "lower",
                         score.get("stderr"), low, high, score.get("stderr_method", "not recorded"),
                         member.get("seed")])
    return pd.DataFrame(rows, columns=COLUMNS)


AVERAGE_STDERR = "sqrt(sum of the tasks' stderr^2) / tasks (tasks independent); normal 95% interval"


def category_averages(table: pd.DataFrame) -> pd.DataFrame:
    """Each member's mean score per task category (the rows a 'task' of the ladder plot), its standard
    error from the tasks' (``AVERAGE_STDERR``; none when a task has none)."""
    from ettin.evaluation.uncertainty import Z95

    keys = ["member", "size", "parameters", "objective", "origin", "series", "category", "direction"]
    averaged = table.groupby(keys, as_index=False, dropna=False).agg(
        seed=("seed", "first"),
        score=("score", "mean"), tasks=("score", "size"), variance=("stderr", lambda e: (e.astype(float) ** 2).sum()
                                                                    if e.notna().all() else float("nan")))
    averaged["stderr"] = averaged["variance"] ** 0.5 / averaged["tasks"]
    averaged["ci95_low"] = averaged["score"] - Z95 * averaged["stderr"]
    averaged["ci95_high"] = averaged["score"] + Z95 * averaged["stderr"]
    averaged["stderr_method"] = AVERAGE_STDERR
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
    """Per size, the native pair, the encoder and the diffusion member, and the cross pair compared check
    by check (same data, same order, same schedule); across sizes, each size's first member against the
    first size's (same data)."""
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

    seeds = list(dict.fromkeys(m.get("seed") for m in members))
    for size in sizes:
        for seed in seeds:
            for pair in (("encoder", "decoder"), ("encoder", "diffusion"),
                         ("encoder_from_decoder", "decoder_from_encoder")):
                names = [member_name(role, size, seed) for role in pair]
                if all(n in by_name for n in names):
                    compare(names, size if seed is None else f"{size} seed {seed}")
    firsts = [next(m["name"] for m in members if m["size"] == size) for size in sizes]
    for other in firsts[1:]:
        compare([firsts[0], other], "across sizes", ACROSS_SIZES)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


CROSS_COLUMNS = ["member", "against", "task", "metric", "member score", "against score", "difference",
                 "p", "test", "verdict"]


def cross_comparisons(members: Sequence[dict], evaluation: dict) -> pd.DataFrame:
    """Each cross member against its base (the model it continued from) and against the native member of the
    kind it became, task by task: the paired test of the pair report (ettin.report.scores.compare_results),
    "<member> ahead" when p < LEVEL, else "within noise"."""
    names = {m["name"] for m in members}
    rows = []
    for member in members:
        if member["role"] not in BASE:
            continue
        kind = member["role"].split("_from_")[0]
        for against in (member_name(BASE[member["role"]], member["size"], member.get("seed")),
                        member_name(kind, member["size"], member.get("seed"))):
            if against not in names:
                continue
            mine, theirs = (evaluation["models"][n]["tasks"] for n in (member["name"], against))
            for task in sorted(set(mine) & set(theirs)):
                a, b = mine[task], theirs[task]
                if a["metric"] != b["metric"]:
                    continue
                compared = scores.compare_results(a, b)
                winner = scores.decided_winner(compared, member["name"], against, bool(a.get("higher_is_better", True)))
                verdict = f"{winner} ahead" if winner in (member["name"], against) else winner
                rows.append([member["name"], against, task, a["metric"], a["score"], b["score"],
                             compared["difference"] if compared else None,
                             compared["p_value"] if compared else None, compared["test"] if compared else "-",
                             verdict])
    return pd.DataFrame(rows, columns=CROSS_COLUMNS)


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
              f"(log axis): {', '.join(s for s in plots.SERIES_ORDER if s in set(table['series']))}. "
              "Bars: 95% intervals "
              "(suite.csv's stderr, ci95_low, ci95_high and stderr_method; an average's stderr is "
              f"{AVERAGE_STDERR})."),
        image(plots.plot_ladder(ladder, paper), out, "ladder.png", "scores against parameters"),
        ("table", ladder.pivot_table(index=["task", "metric", "direction"],
                                     columns=["series", "size"], values="score")
         .round(4).reset_index().pipe(_flat_columns)),
        *_paper_blocks(table, paper),
        *_seed_blocks(table),
        *_cross_blocks(members, evaluation),
        ("h2", "Data and schedule identity across members"),
        ("p", f"{len(checks)} checks, {differs} differ. Each size's encoder and decoder (its diffusion "
              "member and its two cross members) must have seen the same data in the same order under the "
              "same schedule; every size must have trained on the same data."),
        ("table", checks),
    ]
    write_text(out / "report.md", render_markdown(blocks))
    write_text(out / "report.html", render_html(blocks, out, title=title))
    return out / "report.md"


def seed_spread(table: pd.DataFrame) -> pd.DataFrame:
    """Per series, size and task: the seeds trained, the mean score over them and their standard deviation
    (n-1), beside the mean of the seeds' own evaluation standard errors (noise of one evaluation)."""
    seeded = table[table["seed"].notna()]
    if seeded.empty:
        return pd.DataFrame()
    return (seeded.groupby(["series", "size", "task"], as_index=False, sort=False)
            .agg(seeds=("seed", "nunique"), mean=("score", "mean"), seed_std=("score", "std"),
                 mean_stderr=("stderr", "mean")))


def _seed_blocks(table: pd.DataFrame) -> list[tuple]:
    spread = seed_spread(table)
    if spread.empty:
        return []
    return [("h2", "Spread over training seeds"),
            ("p", "Each member trained with several seeds (seeds=N): per series, size and task the mean over the "
                  "seeds, the standard deviation of the seeds' scores (n-1; the training-seed noise) and the mean "
                  "of their evaluation standard errors (the noise of one evaluation on these examples)."),
            ("table", spread.round(4))]


def _cross_blocks(members: Sequence[dict], evaluation: dict) -> list[tuple]:
    """Where each cross-objective member can and cannot be told apart from its base and its native kind."""
    from ettin.evaluation.uncertainty import LEVEL

    compared = cross_comparisons(members, evaluation)
    if compared.empty:
        return []
    apart = compared[compared["verdict"].str.endswith(" ahead")]
    return [("h2", "Cross-objective members against their base and their native kind"),
            ("p", f"Each cross member against the model it continued from and against the native member of the "
                  f"kind it became, on the same examples (McNemar exact for accuracy, a paired bootstrap otherwise; "
                  f"one is ahead when p < {LEVEL}). Distinguishable on {len(apart)} of {len(compared)} "
                  f"comparisons; the rest are within noise (or not tested, where a score has no error)."),
            ("table", compared.round(4))]


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
