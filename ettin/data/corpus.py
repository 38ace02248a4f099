"""The built-in offline corpus: documentation that ships with every Python install.

Two parts, in a fixed order:

1. ``pydoc_data.topics``: the language reference's help topics (``help("if")`` and friends), one
   document per topic, sorted by name;
2. the docstrings of the standard library's modules, classes and functions (at least ``MIN_CHARS``
   characters), file by file in sorted order, test suites and IDLE left out.

About 1.5-2 MB of English prose with some code, the same on every machine with the same Python
version (the standard library is the only input). No network, no download.
"""

from __future__ import annotations

import ast
import functools
import gc
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

MIN_CHARS = 200
SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return []
    return [(f"pydoc_data/topics:{name}", text.strip()) for name, text in sorted(topics.items())
            if len(text.strip()) >= MIN_CHARS]


def _docstrings(path: Path, relative: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    found: list[tuple[str, str]] = []

    def visit(node, qualname: str) -> None:
        text = ast.get_docstring(node, clean=True)
        if text and len(text) >= MIN_CHARS:
            found.append((f"{relative}:{qualname or '<module>'}", text))
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}" if qualname else child.name)

    visit(tree, "")
    return found


@functools.lru_cache(maxsize=2)
def _all_documents(root: str) -> tuple[tuple[str, str], ...]:
    base = Path(root)
    documents = _topics()
    enabled = gc.isenabled()
    gc.disable()  # ast.parse builds many objects; the collector triples its time
    try:
        for path in sorted(base.rglob("*.py")):
            relative = path.relative_to(base).as_posix()
            if SKIP_PARTS.intersection(relative.split("/")[:-1]) or "test" in path.stem.split("_")[:1]:
                continue
            documents.extend(_docstrings(path, relative))
    finally:
        if enabled:
            gc.enable()
    return tuple(documents)


def builtin_documents(max_chars: Optional[int] = None) -> Iterator[tuple[str, str]]:
    """(document id, text) of the built-in corpus in its fixed order; ``max_chars`` stops after the
    document that reaches that many characters (for quick tests)."""
    total = 0
    for name, text in _all_documents(str(stdlib_root())):
        yield name, text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def describe() -> str:
    import sys

    documents = _all_documents(str(stdlib_root()))
    chars = sum(len(t) for _, t in documents)
    return (f"built-in corpus: {len(documents):,} documents, {chars / 1e6:.2f} M characters "
            f"(Python {sys.version.split()[0]} documentation topics and standard-library docstrings)")


def builtin_data_path(data_dir, seq_len: int) -> Path:
    """Where a run prepares the built-in corpus for a sequence length (``data: [{path: builtin}]``)."""
    return Path(data_dir) / f"builtin-{seq_len}"
