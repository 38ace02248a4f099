"""Tokenizers: special ids are read from the tokenizer; the trained BPE is ModernBERT-style."""

from __future__ import annotations

import json

import pytest
from data_fixtures import data_root, tiny_tokenizer  # noqa: F401

from ettin.data.tokenizer import (SPECIALS, check_vocab, load_tokenizer, main, set_objective_template,
                                  special_ids, tokenizer_fingerprint, train_tokenizer)


def test_trained_tokenizer_is_modernbert_style(tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    assert len(tokenizer) % 64 == 0
    ids = special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    assert (ids.cls, ids.sep, ids.pad, ids.mask, ids.unk) == tuple(vocab[t] for t in SPECIALS.values())
    assert ids.bos == ids.cls and ids.eos == ids.sep
    # The padding tokens are special: never masked, never drawn as replacements.
    unused = [i for t, i in vocab.items() if t.startswith("[unused")]
    assert set(unused) <= ids.all and {ids.cls, ids.sep, ids.pad, ids.mask, ids.unk} <= ids.all
    encoded = tokenizer("Return the value.")["input_ids"]
    assert encoded[0] == ids.cls and encoded[-1] == ids.sep
    assert tokenizer.decode(encoded[1:-1]) == "Return the value."
    assert "token_type_ids" not in tokenizer("x")
    # [MASK] swallows the space before it, as ModernBERT's does.
    masked = tokenizer("is [MASK].", add_special_tokens=False)["input_ids"]
    assert ids.mask in masked and tokenizer.decode(masked) == "is[MASK]."


def test_byte_level_bpe_round_trips_any_text(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    text = "Ünïcödé — 数字 🙂\ttabs\n\n  spaces  and \"quotes\" [CLS] literal"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_training_is_deterministic_and_pads_to_64(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen"] * 5
    a = train_tokenizer(texts, 300, tmp_path / "a")
    b = train_tokenizer(texts, 300, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert len(a) % 64 == 0 and len(a) >= 261
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    # The objective's template adds only specials, which prepare adds itself: same ids, same print.
    set_objective_template(b, causal=True)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    c = train_tokenizer(["sphinx of black quartz judge my vow " * 20] * 5, 300, tmp_path / "c")
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)


def test_cli_trains_from_a_folder(tmp_path, capsys):
    corpus = tmp_path / "text"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text to learn merges from. " * 50)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "more words, more merges"}) + "\n")
    assert main([f"input={corpus}", f"output={tmp_path / 'tok'}", "vocab_size=320"]) == 0
    assert "saved a" in capsys.readouterr().out
    assert len(load_tokenizer(tmp_path / "tok")) % 64 == 0
    assert main(["input=x"]) == 2  # no output
    assert main(["bogus=1", "input=x", "output=y"]) == 2


def test_special_ids_come_from_the_tokenizer_not_literals(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 7, "</s>": 3, "a": 0, "b": 1, "c": 2, "d": 4, "e": 5, "f": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    gpt_like = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    ids = special_ids(gpt_like)
    assert (ids.cls, ids.sep, ids.pad, ids.mask) == (7, 3, None, None)
    bare = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match=r"no \[CLS\]/BOS and \[SEP\]/EOS token"):
        special_ids(bare)


def test_check_vocab_names_the_fix(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    check_vocab(tokenizer, len(tokenizer))
    with pytest.raises(ValueError, match=r"model.vocab_size=512"):
        check_vocab(tokenizer, 256)


def test_missing_tokenizer_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m ettin.data.tokenizer"):
        load_tokenizer(tmp_path / "nothing-here")


@pytest.mark.parametrize("offline", [True, False])
def test_unreachable_hub_tokenizer_fails_at_once_naming_the_id(monkeypatch, offline):
    import time

    from huggingface_hub import constants

    import ettin.data.tokenizer as tokenizers

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(tokenizers, "_reachable", lambda url, timeout_s=3.0: False)
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'someone/no-such-tokenizer'.*huggingface-cli download"):
        load_tokenizer("someone/no-such-tokenizer")
    assert time.monotonic() - started < 10


def test_cached_hub_tokenizer_loads_offline(tiny_tokenizer, monkeypatch):
    """local_files_only is tried first: what is in the cache loads with no network at all."""
    import transformers

    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def from_cache(spec, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return real(str(tiny_tokenizer), **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_cache)
    tokenizer = load_tokenizer("someone/cached-tokenizer")
    assert calls == [True] and len(tokenizer) == len(load_tokenizer(tiny_tokenizer))
