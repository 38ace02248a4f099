"""The Ettin paper's reported scores (paper_scores.json) beside ours.

A model is compared when it is a released Ettin model (hub id ``jhu-clsp/ettin-{encoder,decoder}-SIZE``)
or has the shape of an Ettin size (a run of ours, or any folder with that shape); the paper's numbers
are percentages, ours are shown x100 beside them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

PAPER_SCORES = Path(__file__).with_name("paper_scores.json")


@lru_cache(maxsize=1)
def paper_scores() -> dict:
    return json.loads(PAPER_SCORES.read_text())


def paper_entry(kind: str, size: Optional[str]) -> Optional[dict[str, tuple[float, dict]]]:
    """{task: (percent, its source in paper_scores.json)} for an Ettin kind and size; None if none."""
    if size is None:
        return None
    entry = paper_scores()["models"].get(f"{kind}-{size}")
    if entry is None:
        return None
    sources = paper_scores()["sources"]
    scores = {task: (value, sources[entry["source"]]) for task, value in entry["scores"].items()}
    scores.update({task: (value, sources[entry["text_source"]])
                   for task, value in entry.get("text_scores", {}).items()})
    return scores


def _with_averages(tasks: dict) -> dict[str, float]:
    """{task: score} plus the paper's averages: generative ``average`` and ``glue_average`` when every
    task they average was scored, MTEB(eng, v2)'s clustering and retrieval means when it ran."""
    from ettin.evaluation.registry import PAPER_GENERATIVE, PAPER_GLUE

    scores = {task: result["score"] for task, result in tasks.items()}
    by_type = tasks.get("mteb_v2_eng", {}).get("mean_by_type", {})
    scores.update({f"mteb_v2_eng_{kind.lower()}": by_type[kind] for kind in ("Clustering", "Retrieval")
                   if kind in by_type})
    for average, members in (("average", PAPER_GENERATIVE), ("glue_average", PAPER_GLUE)):
        if all(t.name in scores for t in members):
            scores[average] = sum(scores[t.name] for t in members) / len(members)
    return scores


def comparison_rows(report: dict) -> list[tuple[str, str, float, float, str]]:
    """(model, task, ours in percent, paper's, citation) for every score the paper also reports."""
    rows = []
    for name, model in report["models"].items():
        scores = paper_entry(model["kind"], model.get("ettin_size"))
        for task, score in (_with_averages(model["tasks"]).items() if scores else ()):
            if task in scores:
                value, source = scores[task]
                rows.append((name, task, 100 * score, value,
                             f"arXiv {source['arxiv']} {source['version']}, {source['table']}"))
    return rows


def format_comparison(report: dict) -> str:
    rows = comparison_rows(report)
    if not rows:
        return ""
    lines = ["beside the Ettin paper (percent; ours - paper):"]
    width = max(len(r[0]) for r in rows)
    for name, task, ours, paper, cite in rows:
        lines.append(f"  {name.ljust(width)}  {task:<16} ours {ours:6.2f}  paper {paper:5.1f}  "
                     f"diff {ours - paper:+6.2f}  ({cite})")
    return "\n".join(lines)
