"""Tokenizers: load any Hugging Face tokenizer and read every special id from it (never literals);
train a small byte-level BPE with ModernBERT-style specials for the offline default.

    python -m ettin.data.tokenizer input=PATH|builtin output=DIR [vocab_size=4096]
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

# ModernBERT's special tokens, in the order they get the first ids of a trained vocabulary.
SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}
VOCAB_MULTIPLE = 64


@dataclass(frozen=True)
class SpecialIds:
    """Every special id ettin uses, read from a tokenizer.

    ``cls`` begins every prepared row (the decoder's BOS); ``sep`` ends a document (the decoder's
    EOS). ``pad``/``mask``/``unk`` are None when the tokenizer has none (a decoder tokenizer without
    [MASK] can still train CLM). ``all`` holds every special id, the unused padding tokens included:
    those are never masked and never drawn as random replacements."""

    cls: int
    sep: int
    pad: Optional[int]
    mask: Optional[int]
    unk: Optional[int]
    all: frozenset

    @property
    def bos(self) -> int:
        return self.cls

    @property
    def eos(self) -> int:
        return self.sep


def load_tokenizer(path_or_id: str | os.PathLike):
    """A fast tokenizer from a local folder (or a ``tokenizer.json`` file), or a hub id when online."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = str(path_or_id)
    path = Path(spec)
    try:
        if path.is_file() and path.suffix == ".json":
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=spec)
        elif path.exists():
            tokenizer = AutoTokenizer.from_pretrained(spec, use_fast=True)
        else:
            tokenizer = _hub_tokenizer(spec)
    except FileNotFoundError:
        raise
    except Exception as error:  # OSError, ValueError, HF hub errors: all mean "cannot load"
        where = "the folder exists but holds no loadable tokenizer" if path.exists() else (
            "no such local folder, and it cannot be fetched as a hub id (offline, or not on the hub)")
        raise FileNotFoundError(
            f"cannot load tokenizer {spec!r}: {where} ({type(error).__name__}: {error}). Give a "
            "tokenizer folder (train one with: python -m ettin.data.tokenizer input=TEXT_PATH "
            "output=DIR), or a hub id while online."
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {spec!r} has no fast (Rust) version; ettin needs one")
    return tokenizer


def _hub_tokenizer(repo_id: str):
    """A hub tokenizer: from the local Hugging Face cache first; online only when the hub is
    reachable (a quick probe), so an offline machine fails in seconds, not after minutes of retries."""
    from huggingface_hub import constants
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(repo_id, use_fast=True, local_files_only=True)
    except OSError:
        pass
    fix = (f"download it while online (huggingface-cli download {repo_id}) or give a local "
           "tokenizer folder (train one: python -m ettin.data.tokenizer input=TEXT_PATH output=DIR)")
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"tokenizer {repo_id!r} is not in the local Hugging Face cache and "
                                f"HF_HUB_OFFLINE is set: {fix}") from None
    if not _reachable(constants.ENDPOINT):
        raise FileNotFoundError(f"tokenizer {repo_id!r} is not a local folder, not in the local "
                                f"Hugging Face cache, and {constants.ENDPOINT} cannot be reached "
                                f"(offline?): {fix}") from None
    return AutoTokenizer.from_pretrained(repo_id, use_fast=True)


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout_s``."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def special_ids(tokenizer) -> SpecialIds:
    """The special ids of ``tokenizer`` (BERT-style names first, then BOS/EOS)."""

    def first(*names: str) -> Optional[int]:
        for name in names:
            value = getattr(tokenizer, f"{name}_token_id", None)
            if value is not None:
                return int(value)
        return None

    cls, sep = first("cls", "bos"), first("sep", "eos")
    if cls is None or sep is None:
        missing = " and ".join(n for n, v in (("[CLS]/BOS", cls), ("[SEP]/EOS", sep)) if v is None)
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {missing} token; ettin "
            "starts every row with [CLS] (BOS) and ends every document with [SEP] (EOS). Use a "
            "ModernBERT-style tokenizer or set cls_token/sep_token (or bos_token/eos_token) on it."
        )
    added = {int(i) for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return SpecialIds(cls=cls, sep=sep, pad=first("pad"), mask=first("mask"), unk=first("unk"),
                      all=frozenset(set(map(int, tokenizer.all_special_ids)) | added))


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raise if a token id of ``tokenizer`` would fall outside the model's embedding table."""
    size = len(tokenizer)
    if size > model_vocab_size:
        padded = -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        raise ValueError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has {size:,} tokens but the "
            f"model's vocabulary has {model_vocab_size:,}: ids >= {model_vocab_size} would index past "
            f"the embedding table. Set model.vocab_size={padded} (a multiple of {VOCAB_MULTIPLE}), or "
            "use the tokenizer the model was trained with."
        )


def set_objective_template(tokenizer, *, causal: bool) -> None:
    """What ``tokenizer(text)`` adds, matching how the objective's rows look in training: an encoder
    sees ``[CLS] text [SEP]``; a decoder starts with BOS (``[CLS]``) and gets no EOS, because it is
    asked to continue the text. Set on the Rust backend, so the saved tokenizer.json, the Python
    tokenizer and the Rust tokenizer all agree."""
    from tokenizers import processors

    ids = special_ids(tokenizer)
    cls, sep = tokenizer.convert_ids_to_tokens([ids.cls, ids.sep])
    single, pair = (f"{cls} $A", f"{cls} $A $B") if causal else (f"{cls} $A {sep}", f"{cls} $A {sep} $B {sep}")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(cls, ids.cls), (sep, ids.sep)])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides the ids of a text (vocabulary, merges, normalizer, specials);
    not the template (``set_objective_template``), which only adds specials that ettin adds itself."""
    import hashlib

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    for setting in ("truncation", "padding", "post_processor"):
        backend.pop(setting, None)
    text = json.dumps(backend, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path | str):
    """Train a byte-level BPE with ``[CLS] [SEP] [PAD] [MASK] [UNK]`` (ids 0-4) on ``texts``, pad its
    vocabulary with ``[unused<i>]`` special tokens to a multiple of 64, and save it as a folder that
    ``AutoTokenizer`` loads (template ``[CLS] $A [SEP]``). Returns the loaded tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                         f"(at least {256 + len(SPECIALS)}: 256 bytes and the special tokens)")
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIALS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    trained = tokenizer.get_vocab_size()
    padded = -(-trained // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    tokenizer.add_special_tokens([AddedToken(f"[unused{i}]", special=True)
                                  for i in range(padded - trained)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, special=True), unk_token="[UNK]",
        bos_token="[CLS]", eos_token="[SEP]", model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False,
    )
    set_objective_template(fast, causal=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def ensure_builtin_tokenizer(out_dir: Path | str, vocab_size: int = 2048):
    """The offline default's tokenizer: trained on the built-in corpus the first time, then loaded.
    The folder appears complete or not at all (written aside, then renamed)."""
    from ettin.data.corpus import builtin_documents
    from ettin.data.files import file_lock
    from ettin.store.fs import publishing

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out_dir.with_name(out_dir.name + ".lock")):
        if not (out_dir / "tokenizer.json").exists():
            with publishing(out_dir) as temp:
                train_tokenizer((text for _, text in builtin_documents()), vocab_size, temp)
    return load_tokenizer(out_dir)


USAGE = "usage: python -m ettin.data.tokenizer input=PATH|builtin output=DIR [vocab_size=4096] " \
        "[text_column=text]"


def main(argv: Optional[list[str]] = None) -> int:
    from ettin.data.reading import read_documents

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        args = dict(a.split("=", 1) for a in argv)
    except ValueError:
        args = {}
    unknown = set(args) - {"input", "output", "vocab_size", "text_column"}
    if unknown or not {"input", "output"} <= set(args):
        print(f"error: unknown or missing arguments in {argv}\n{USAGE}", file=sys.stderr)
        return 2
    texts = (doc.text for doc in read_documents(args["input"], args.get("text_column", "text")))
    tokenizer = train_tokenizer(texts, int(args.get("vocab_size", 4096)), args["output"])
    ids = special_ids(tokenizer)
    print(f"saved a {len(tokenizer):,}-token byte-level BPE to {args['output']} "
          f"([CLS]={ids.cls} [SEP]={ids.sep} [PAD]={ids.pad} [MASK]={ids.mask} [UNK]={ids.unk})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
