"""Reading text: the documents of a file, a folder, the built-in corpus or a hub dataset, in a fixed
order, with the documents and files left out counted (shared by ``prepare`` and the tokenizer
trainer)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet", ".csv": "csv"}
TEXT_UNITS = ("document", "paragraph", "line")


@dataclass
class Document:
    index: int
    source: str
    text: str


LISTED_ROWS = 20  # skipped rows named (line and reason) per file; all are counted


@dataclass
class Skips:
    """Documents, rows and files left out, and why (reported in summary.json and on the console)."""

    documents: dict = field(default_factory=dict)  # reason -> count
    files: dict = field(default_factory=dict)  # path -> reason
    rows: dict = field(default_factory=dict)  # path -> {"count": n, "lines": {line: reason}}
    strict: bool = False  # a malformed row is an error instead of a counted skip

    def document(self, reason: str) -> None:
        self.documents[reason] = self.documents.get(reason, 0) + 1

    def file(self, path: str, reason: str) -> None:
        self.files[str(path)] = reason

    def row(self, path: Path, line: int, reason: str) -> None:
        """A malformed row of a .jsonl/.csv file (``line``: its first line, from 1), left out while
        the rest of the file is kept."""
        if self.strict:
            raise PrepareError(f"{path} line {line}: {reason}. Fix or remove the row, or run with "
                               "strict=false to skip malformed rows (they are counted in "
                               "summary.json).")
        entry = self.rows.setdefault(str(path), {"count": 0, "lines": {}})
        entry["count"] += 1
        if len(entry["lines"]) < LISTED_ROWS:
            entry["lines"][str(line)] = reason
            print(f"warning: skipped {path} line {line}: {reason}", file=sys.stderr)


class PrepareError(ValueError):
    """Input that cannot be prepared; the message names the problem and the fix."""



# ------------------------------------------------------------------------------------------------
# Reading


def read_documents(spec: str, text_column: str = "text", *, text_unit: str = "document",
                   split: str = "train", hub_config: Optional[str] = None,
                   skips: Optional[Skips] = None, strict: bool = False) -> Iterator[Document]:
    """The documents of ``spec`` in a fixed order; empty documents, malformed .jsonl/.csv rows and
    unreadable files are counted in ``skips`` and left out (``strict``: malformed rows and unreadable
    files raise)."""
    skips = Skips() if skips is None else skips
    skips.strict = strict
    if text_unit not in TEXT_UNITS:
        raise PrepareError(f"text_unit={text_unit!r}; choose one of {', '.join(TEXT_UNITS)}")
    counter = iter(range(1 << 62))

    def emit(source: str, text: Any) -> Iterator[Document]:
        if text is None or (isinstance(text, str) and not text.strip()):
            skips.document("empty document")
            return
        if not isinstance(text, str):
            skips.document(f"not a string ({type(text).__name__})")
            return
        yield Document(next(counter), source, text)

    if spec == "builtin":
        from ettin.data.corpus import builtin_documents

        for _, text in builtin_documents():
            yield from emit("builtin", text)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_hub_id(spec):
            yield from _hub_documents(spec, hub_config, split, text_column, emit)
            return
        raise FileNotFoundError(
            f"input {spec!r} does not exist. Give a file or folder of "
            f"{'/'.join(TEXT_SUFFIXES)} files, input=builtin for the built-in corpus, or a Hugging "
            "Face dataset name (owner/name, online)."
        )
    files = input_files(path)
    root = path if path.is_dir() else path.parent
    for file in files:
        source = file.relative_to(root).as_posix()
        try:
            if TEXT_SUFFIXES[file.suffix.lower()] == "text":
                yield from _text_file(file, source, text_unit, emit)
            else:
                yield from _table_file(file, source, text_column, emit, skips)
        except PrepareError:
            raise
        except (OSError, ValueError) as error:  # undecodable bytes, malformed json/csv/parquet
            reason = _short_reason(error)
            if strict:
                raise PrepareError(
                    f"cannot read {file}: {reason}. Fix or remove the file, or run with "
                    "strict=false to skip unreadable files (they are counted in summary.json)."
                ) from None
            skips.file(str(file), reason)
            print(f"warning: skipped {file}: {reason}", file=sys.stderr)


def input_files(path: Path) -> list[Path]:
    """Every readable file of a file or folder, sorted (hidden files and folders left out)."""
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise PrepareError(f"{path}: unsupported file type {path.suffix!r}; supported: "
                               f"{', '.join(TEXT_SUFFIXES)}")
        return [path]
    files, others = [], set()
    for file in sorted(path.rglob("*")):
        if not file.is_file() or any(p.startswith(".") for p in file.relative_to(path).parts):
            continue
        if file.suffix.lower() in TEXT_SUFFIXES:
            files.append(file)
        else:
            others.add(file.suffix or file.name)
    if not files:
        found = f" (found only: {', '.join(sorted(others)[:10])})" if others else " (it is empty)"
        raise FileNotFoundError(
            f"no {'/'.join(TEXT_SUFFIXES)} files under {path}{found}"
        )
    return files


def _short_reason(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (invalid byte at offset {error.start})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{type(error).__name__}: {text[:300]}"


def _text_file(file: Path, source: str, unit: str, emit) -> Iterator[Document]:
    text = file.read_bytes().decode("utf-8")  # strict: a non-UTF-8 file is skipped whole
    if unit == "document":
        yield from emit(source, text)
    elif unit == "line":
        for line in text.splitlines():
            yield from emit(source, line)
    else:
        import re

        for paragraph in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text):
            yield from emit(source, paragraph)


def _table_file(file: Path, source: str, column: str, emit, skips: Skips) -> Iterator[Document]:
    import datasets

    if file.suffix.lower() == ".jsonl":
        yield from _json_lines(file, source, column, emit, skips)
        return
    if file.suffix.lower() == ".csv":
        yield from _csv_rows(file, source, column, emit, skips)
        return
    kind = TEXT_SUFFIXES[file.suffix.lower()]
    # streaming=True reads the file in place: no Arrow copy in the datasets cache.
    table = datasets.load_dataset(kind, data_files=str(file), split="train", streaming=True)
    names = table.column_names
    if names is None:  # json: columns are only known once read
        first = next(iter(table), None)
        names = list(first) if first is not None else [column]
    if column not in names:
        raise PrepareError(f"{file} has no column {column!r} (columns: {', '.join(names)}); set "
                           "text_column=NAME")
    for batch in table.select_columns([column]).iter(batch_size=1024):
        for text in batch[column]:
            yield from emit(source, text)


def _decoded_lines(file: Path, skips: Skips) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every line; a line that is not UTF-8 is a counted skip (the
    lines after it are kept)."""
    with file.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                skips.row(file, number, f"not UTF-8 text (invalid byte at offset {error.start})")


def _json_lines(file: Path, source: str, column: str, emit, skips: Skips) -> Iterator[Document]:
    """A .jsonl file line by line: a line that is not a JSON object is a counted skip named by its
    line number (Arrow's reader gives up on the whole file; the rows after it are kept here)."""
    import json

    checked = False
    for number, line in _decoded_lines(file, skips):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            skips.row(file, number, f"not JSON ({str(error).splitlines()[0][:200]})")
            continue
        if not isinstance(row, dict):
            skips.row(file, number, f"a JSON {type(row).__name__}, not an object")
            continue
        if not checked and column not in row:  # the first row names the file's columns
            raise PrepareError(f"{file} has no column {column!r} (columns: {', '.join(row)}); set "
                               "text_column=NAME")
        checked = True
        yield from emit(source, row.get(column))


def _csv_rows(file: Path, source: str, column: str, emit, skips: Skips) -> Iterator[Document]:
    """A .csv file (header line, then rows; quoted fields may span lines): a row with another number
    of fields than the header is a counted skip named by its first line number."""
    import csv

    numbered = _decoded_lines(file, skips)
    first_line: list = [None]  # of the row being read

    def lines() -> Iterator[str]:
        for number, text in numbered:
            if first_line[0] is None:
                first_line[0] = number
            yield text

    csv.field_size_limit(2**31 - 1)  # a document may be longer than the module's 128 kB default
    reader = csv.reader(lines())
    header = next(reader, None)
    if header is None:
        return
    if column not in header:
        raise PrepareError(f"{file} has no column {column!r} (columns: {', '.join(header)}); set "
                           "text_column=NAME")
    position = header.index(column)
    while True:
        first_line[0] = None
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            skips.row(file, first_line[0], f"not a CSV row ({error})")
            continue
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            skips.row(file, first_line[0], f"{len(row)} fields where the header has {len(header)}")
            continue
        yield from emit(source, row[position])


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (not spec.startswith((".", "/", "~")) and 1 <= len(parts) <= 2 and all(parts)
            and not Path(spec).suffix.lower() in TEXT_SUFFIXES)


def _hub_documents(name: str, config: Optional[str], split: str, column: str,
                   emit) -> Iterator[Document]:
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
        names = rows.column_names
        if names is not None and column not in names:
            raise PrepareError(f"hub dataset {name!r} has no column {column!r} (columns: "
                               f"{', '.join(names)}); set text_column=NAME")
        iterator = rows.select_columns([column]).iter(batch_size=1024)
        for batch in iterator:
            for text in batch[column]:
                yield from emit(name, text)
    except PrepareError:
        raise
    except Exception as error:  # offline, no such dataset, gated, ...
        raise FileNotFoundError(
            f"input {name!r} is not a local path, and reading it as a Hugging Face dataset failed "
            f"({_short_reason(error)}). Check the path, or go online / log in for hub datasets "
            "(hub_config=... and split=... select a configuration and split)."
        ) from None


def input_fingerprint(spec: str) -> str:
    """What identifies the input: file names, sizes and modification times (builtin: the Python
    version; a hub dataset: its name)."""
    if spec == "builtin":
        from ettin.data.corpus import stdlib_root

        return f"builtin:python-{sys.version.split()[0]}:{stdlib_root()}"
    path = Path(spec).expanduser()
    if not path.exists():
        return f"hub:{spec}"
    digest = hashlib.sha1()
    for file in input_files(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path if path.is_dir() else path.parent)}\0{stat.st_size}"
                      f"\0{stat.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"
