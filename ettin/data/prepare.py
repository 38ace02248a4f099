"""Raw text -> tokenized, chunked MDS shards, in one command:

    python -m ettin.data.prepare input=PATH output=DIR tokenizer=PATH_OR_ID max_seq_len=N

``input`` is a file or folder of .txt / .md / .jsonl / .json / .parquet / .csv (tables are read
through ``datasets``), ``builtin`` (the offline corpus, ettin/data/corpus.py), or a Hugging Face
dataset name when online. The output is objective-agnostic: the encoder and the decoder of a pair
train on the very same shards.

    DIR/train/, DIR/validation/  MDS shards (columns input_ids: ndarray uint16/uint32, doc_id: int)
                                 + lengths.npy (int32, the length of every sample, in order)
    DIR/tokenizer/               the tokenizer used (training loads it from here)
    DIR/summary.json             settings, documents/chunks/tokens per split and source, skipped
                                 documents, files and rows and why (a malformed .jsonl/.csv row:
                                 its file, line number and reason; the rest of the file is kept),
                                 bytes on disk, time
    DIR/COMPLETE                 written last, inside a temporary folder that is then renamed to
                                 DIR: a folder without it is never taken as finished

Documents are chunked, never truncated. With C = max_seq_len - 2 a document of n tokens becomes
ceil(n / C) chunks ``[CLS] t_i ... t_j``; the last one also ends with ``[SEP]``. No token is lost or
duplicated. A middle chunk has max_seq_len - 1 tokens, so an encoder can close it with ``[SEP]``
(collators do, for MLM/MNTP) and every row stays within max_seq_len. A short tail (fewer than
``min(min_tail, C // 2)`` tokens) is not dropped or padded: the last two chunks share their tokens
equally instead (Ettin back-filled short chunks from the previous one, duplicating tokens).

Run it again with the same settings and it does nothing; other settings on a finished folder are an
error (or ``overwrite=true``). Tokenization runs in ``num_proc`` processes; the result does not
depend on that number.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional


from ettin.data.files import file_lock
from ettin.store.fs import clean_stale
from ettin.data.reading import (TEXT_UNITS, PrepareError)
from ettin.data.tokenizer import load_tokenizer

from ettin.data.executor import run_executor
from ettin.data.shards import CHUNKINGS, PrepareConfig, settings_of, write_folder
from ettin.store.fs import is_complete

EXECUTORS = ("none", "local", "slurm")
def prepare(cfg: Optional[PrepareConfig] = None, tokenizer=None, **fields) -> Path:
    """Prepare ``cfg.output`` (or ``PrepareConfig(**fields)``) and return it; a finished folder with
    the same settings is returned as it is. ``tokenizer`` may be a loaded tokenizer (its folder name
    is then taken from it) or a path/hub id."""
    if cfg is None:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
            fields.setdefault("tokenizer", getattr(tokenizer, "name_or_path", "") or "<object>")
        elif tokenizer is not None:
            fields["tokenizer"] = str(tokenizer)
        cfg = PrepareConfig(**fields)
    elif fields:
        raise TypeError("give a PrepareConfig or keyword fields, not both")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(cfg.tokenizer if tokenizer is None else tokenizer)
    _check_config(cfg)
    if cfg.add_prefix_space:
        from tokenizers import pre_tokenizers

        if not isinstance(tokenizer.backend_tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel):
            raise PrepareError(f"add_prefix_space=true needs a byte-level BPE tokenizer; "
                               f"{cfg.tokenizer!r} is not one: set add_prefix_space=false")
    output = Path(cfg.output).expanduser()
    settings = settings_of(cfg, tokenizer)
    if _finished_with(output, settings, cfg.overwrite):
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(output.with_name(output.name + ".lock")):
        if _finished_with(output, settings, cfg.overwrite):  # another process just finished it
            return output
        clean_stale(output.parent)  # what crashed earlier attempts left
        if cfg.executor != "none":
            run_executor(cfg, tokenizer, settings, output)  # slurm: the merge job finishes it
            return output
        write_folder(cfg, tokenizer, settings, output)
    return output


def _check_config(cfg: PrepareConfig) -> None:
    for name in ("input", "output", "tokenizer"):
        if getattr(cfg, name) in ("???", "", None):
            raise PrepareError(f"{name}=... is required: python -m ettin.data.prepare input=PATH "
                               "output=DIR tokenizer=PATH_OR_ID max_seq_len=N")
    if cfg.max_seq_len < 3:
        raise PrepareError(f"max_seq_len={cfg.max_seq_len} must be at least 3 ([CLS], a token, [SEP])")
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise PrepareError(f"validation_fraction={cfg.validation_fraction} must be in [0, 1)")
    if cfg.text_unit not in TEXT_UNITS:
        raise PrepareError(f"text_unit={cfg.text_unit!r}; choose one of {', '.join(TEXT_UNITS)}")
    if cfg.executor not in EXECUTORS:
        raise PrepareError(f"executor={cfg.executor!r}; choose one of {', '.join(EXECUTORS)}")
    if cfg.tasks < 1:
        raise PrepareError(f"tasks={cfg.tasks} must be at least 1")
    if cfg.chunking not in CHUNKINGS:
        raise PrepareError(f"chunking={cfg.chunking!r}; choose one of {', '.join(CHUNKINGS)}")
    if cfg.chunking == "ettin" and not 0 <= cfg.always_skip_size <= cfg.min_chunk_size <= cfg.max_seq_len - 2:
        raise PrepareError("chunking=ettin needs 0 <= always_skip_size <= min_chunk_size <= "
                           f"max_seq_len - 2 (got {cfg.always_skip_size}, {cfg.min_chunk_size}, "
                           f"{cfg.max_seq_len - 2})")


def _finished_with(output: Path, settings: dict, overwrite: bool) -> bool:
    if not is_complete(output):
        return False
    try:
        previous = json.loads((output / "summary.json").read_text())["settings"]
    except (OSError, ValueError, KeyError):
        previous = {}
    if previous == settings:
        return True
    if overwrite:
        return False
    changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in settings.items()
                        if previous.get(k) != v)
    raise FileExistsError(
        f"{output} is a finished prepared folder with other settings ({changed}). Choose another "
        "output folder, delete this one, or add overwrite=true."
    )


def ensure_prepared(*, input: str, output: str | Path, tokenizer, max_seq_len: int,
                    wait: bool = False, timeout_s: float = 3600, **fields) -> Path:
    """The prepared folder ``output``, preparing it first unless it is finished. ``wait`` (ranks
    other than 0) only waits for another process to finish it."""
    output = Path(output)
    if wait:
        deadline = time.monotonic() + timeout_s
        while not is_complete(output):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited {timeout_s:.0f}s for another process to prepare {output}")
            time.sleep(min(1.0, left))
        return output
    fields.setdefault("progress", False)
    return prepare(None, tokenizer, input=input, output=str(output), max_seq_len=max_seq_len,
                   **fields)


def prepare_command(path: str | Path, max_seq_len: Optional[int] = None,
                    tokenizer: Optional[str] = None) -> str:
    return (f"python -m ettin.data.prepare input=YOUR_TEXT output={path} "
            f"tokenizer={tokenizer or 'TOKENIZER'} max_seq_len={max_seq_len or 'SEQ_LEN'}")


def require_prepared(path: str | Path, max_seq_len: Optional[int] = None) -> Path:
    """``path`` if it is a finished prepared folder, else a clear error with the command to run."""
    path = Path(path)
    if not is_complete(path):
        if path.exists() and (path / "summary.json").exists():
            state = "is unfinished (no COMPLETE marker: its preparation was interrupted)"
        elif path.exists():
            state = "is not a prepared folder (no COMPLETE marker)"
        else:
            state = "does not exist"
        raise FileNotFoundError(
            f"prepared data {path} {state}. Prepare it with: {prepare_command(path, max_seq_len)}"
        )
    return path


def main(argv: Optional[list[str]] = None) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ettin import CONF_DIR

    overrides = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        print("options (key=value):")
        for name, value in asdict(PrepareConfig()).items():
            print(f"  {name}={value}")
        return 0
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            raw = compose("prepare", overrides=overrides)
        merged = OmegaConf.merge(OmegaConf.structured(PrepareConfig), raw)
        cfg: PrepareConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        output = prepare(cfg)
    except (PrepareError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Hydra/OmegaConf: an unknown key or a bad value
        if not type(error).__module__.startswith(("hydra", "omegaconf")):
            raise
        print(f"error: {error}\nusage: python -m ettin.data.prepare input=PATH output=DIR "
              "tokenizer=PATH_OR_ID max_seq_len=N [key=value ...] (--help lists the keys)",
              file=sys.stderr)
        return 2
    if not is_complete(output):  # executor=slurm: submitted, the merge job finishes it
        return 0
    summary = json.loads((output / "summary.json").read_text())
    train, val = summary["splits"]["train"], summary["splits"]["validation"]
    skipped = summary["skipped"]
    print(f"prepared {output}: train {train['documents']:,} documents, {train['chunks']:,} chunks, "
          f"{train['tokens']:,} tokens; validation {val['documents']:,} documents, "
          f"{val['tokens']:,} tokens; skipped {sum(skipped['documents'].values()):,} documents "
          f"{skipped['documents'] or ''} and {skipped['files_count']} files; "
          f"{summary['bytes_on_disk']['total'] / 1e6:.1f} MB; {summary['seconds']} s")
    for file, rows in skipped.get("rows", {}).items():  # malformed rows, the rest of the file kept
        lines = ", ".join(rows["lines"]) + (", ..." if rows["count"] > len(rows["lines"]) else "")
        print(f"skipped {rows['count']:,} malformed rows of {file} (lines {lines}); the rest of the "
              "file was prepared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
