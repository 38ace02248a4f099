"""The offline smoke suite: four small tasks generated from the built-in corpus (ettin.data.corpus),
the same bytes for the same seed, size and Python version.

* ``smoke_cloze`` (generation): a sentence without its last word, and four candidate words (the right
  one and the last words of three other sentences); lm-eval multiple choice, accuracy.
* ``smoke_lm`` (language modelling): held-out passages scored whole; lm-eval
  ``loglikelihood_rolling``: perplexity per word for decoders, pseudo-perplexity for encoders.
* ``smoke_nli`` (classification): a premise sentence and a hypothesis, 3 labels: entailment (a span
  of the premise), neutral (a span of another sentence of the same document), contradiction (a span
  of the premise with a negation added or removed); fine-tuned, accuracy.
* ``smoke_retrieval`` (retrieval): a docstring's summary line is the query, the rest of that
  docstring the relevant passage, among distractor passages; fine-tuned, nDCG@10.
* ``smoke_continuation`` (generation): a prose sentence's first 60 % of words; the model generates
  (lm-eval ``generate_until``, at most 16 tokens, stopping at a newline) and the text is scored
  against the sentence's true rest with chrF (character n-gram F-score, sacrebleu; partial credit
  for partly right words, no decoder in the metric) and exact match. Decoders generate greedily,
  MLM encoders pseudo-causally, MDLM models by unmasking: the three objectives on one generation task.

These are smoke tasks: the smoke models were trained on this very corpus, and the tasks are small.
They show that every model goes through every evaluation path, and move when a model learns; they
are not benchmarks. The cloze and LM tasks are lm-eval task YAMLs over local jsonl files.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ettin.evaluation.models import EvalError

CLOZE, LM, NLI, RETRIEVAL = "smoke_cloze", "smoke_lm", "smoke_nli", "smoke_retrieval"
CONTINUATION = "smoke_continuation"
TASKS = (CLOZE, LM, NLI, RETRIEVAL, CONTINUATION)
NLI_LABELS = ("entailment", "neutral", "contradiction")
NEGATABLE = ("is", "are", "can", "will", "should", "must", "may", "does", "was", "were")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})\.$")


@dataclass(frozen=True)
class SuiteSize:
    """Examples per task. The default takes a few minutes on 2 CPUs for the smoke pair."""

    cloze: int = 400
    lm: int = 40
    nli_train: int = 1200
    nli_test: int = 300
    retrieval_train: int = 600
    retrieval_test: int = 150
    retrieval_distractors: int = 300
    continuation: int = 100

    @classmethod
    def limited(cls, limit: int) -> "SuiteSize":
        """``limit`` test examples per task (training sets 4x, distractors 1x)."""
        if limit < 4:
            raise EvalError(f"limit={limit}: give at least 4 examples per task")
        return cls(cloze=limit, lm=limit, nli_train=4 * limit, nli_test=limit,
                   retrieval_train=4 * limit, retrieval_test=limit, retrieval_distractors=limit,
                   continuation=limit)


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in SENTENCE_END.split(text) if s.strip()]


def _prose_sentences() -> list[tuple[int, str]]:
    """(document index, sentence) for sentences of 8-40 words that read as prose (no code)."""
    from ettin.data.corpus import builtin_documents

    found = []
    for index, (_, text) in enumerate(builtin_documents()):
        for paragraph in text.split("\n\n"):
            if paragraph.startswith((" ", "\t", ">>>")) or "::" in paragraph:
                continue
            for sentence in _sentences(paragraph):
                words = sentence.split()
                if 8 <= len(words) <= 40 and sentence[0].isupper() and not set("{}[]=<>|") & set(sentence):
                    found.append((index, sentence))
    return found


def _cloze(sentences: list[tuple[int, str]], n: int, rng: random.Random) -> list[dict]:
    items = [m.groupdict() for _, s in sentences if (m := LAST_WORD.match(s))]
    rng.shuffle(items)
    chosen, words = items[:n], sorted({item["word"] for item in items})
    if len(chosen) < n or len(words) < 4:
        raise EvalError(f"the built-in corpus gives {len(chosen)} cloze items, {n} asked")
    out = []
    for item in chosen:
        distractors = rng.sample([w for w in words if w.lower() != item["word"].lower()], 3)
        choices = distractors + [item["word"]]
        rng.shuffle(choices)
        out.append({"context": item["context"], "choices": choices, "label": choices.index(item["word"])})
    return out


def _continuations(sentences: list[tuple[int, str]], n: int, rng: random.Random) -> list[dict]:
    """A sentence's first 60 % of words as the context, the rest (with a leading space) the target."""
    items = [s for _, s in sentences]
    rng.shuffle(items)
    out = []
    for sentence in items[:n]:
        words = sentence.split()
        cut = round(0.6 * len(words))
        out.append({"context": " ".join(words[:cut]), "target": " " + " ".join(words[cut:])})
    if len(out) < n:
        raise EvalError(f"the built-in corpus gives {len(out)} continuation items, {n} asked")
    return out


def _span(words: list[str], rng: random.Random) -> list[str]:
    length = max(4, round(len(words) * rng.uniform(0.5, 0.8)))
    start = rng.randrange(len(words) - length + 1)
    return words[start:start + length]


def _negated(span: list[str]) -> Optional[list[str]]:
    """The span with ``not`` removed, or added after its first auxiliary verb; None if neither fits."""
    if "not" in span:
        return [w for w in span if w != "not"]
    for i, word in enumerate(span):
        if word in NEGATABLE:
            return span[:i + 1] + ["not"] + span[i + 1:]
    return None


def _nli(sentences: list[tuple[int, str]], n: int, rng: random.Random) -> list[dict]:
    by_document: dict[int, list[str]] = {}
    for document, sentence in sentences:
        by_document.setdefault(document, []).append(sentence)
    premises = [(d, s) for d, s in sentences if len(by_document[d]) > 1 and _negated(s.split()) is not None]
    rng.shuffle(premises)
    out = []
    for document, premise in premises:
        if len(out) == n:
            break
        label = len(out) % 3  # balanced classes
        words = premise.split()
        if label == 0:
            hypothesis = _span(words, rng)
        elif label == 1:
            hypothesis = _span(rng.choice([s for s in by_document[document] if s != premise]).split(), rng)
        else:
            auxiliaries = [i for i, w in enumerate(words) if w in NEGATABLE or w == "not"]
            centre = rng.choice(auxiliaries)  # a span that holds the word the negation changes
            start = max(0, centre - rng.randint(2, 6))
            hypothesis = _negated(words[start:centre + rng.randint(3, 8)])
        out.append({"premise": premise, "hypothesis": " ".join(hypothesis), "label": label})
    if len(out) < n:
        raise EvalError(f"the built-in corpus gives {len(out)} NLI pairs, {n} asked")
    rng.shuffle(out)
    return out


def _query_passage_pairs() -> list[dict]:
    """Docstrings whose summary line is a query (4+ words) and whose rest is a passage (100+ chars)."""
    from ettin.data.corpus import builtin_documents

    pairs = []
    for name, text in builtin_documents():
        if name.startswith("pydoc_data/"):
            continue
        summary, _, rest = text.partition("\n")
        passage = " ".join(rest.split())[:600]
        if len(summary.split()) >= 4 and len(passage) >= 100:
            pairs.append({"query": summary.strip(), "passage": passage})
    return pairs


def _retrieval(size: SuiteSize, rng: random.Random) -> dict:
    pairs = _query_passage_pairs()
    rng.shuffle(pairs)
    needed = size.retrieval_train + size.retrieval_test + size.retrieval_distractors
    if len(pairs) < needed:
        raise EvalError(f"the built-in corpus gives {len(pairs)} query/passage pairs, {needed} asked")
    train = pairs[:size.retrieval_train]
    test = pairs[size.retrieval_train:size.retrieval_train + size.retrieval_test]
    distractors = pairs[size.retrieval_train + size.retrieval_test:needed]
    return {
        "train": train,
        "queries": {f"q{i}": p["query"] for i, p in enumerate(test)},
        "corpus": {**{f"d{i}": p["passage"] for i, p in enumerate(test)},
                   **{f"x{i}": p["passage"] for i, p in enumerate(distractors)}},
        "relevant": {f"q{i}": [f"d{i}"] for i in range(len(test))},
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _lm_eval_yaml(task: str, data: Path, body: str) -> str:
    return (f"# generated by ettin.evaluation.suite: a smoke task over the built-in corpus\n"
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def generate(out_dir: Path | str, *, seed: int = 0, size: SuiteSize = SuiteSize()) -> Path:
    """Write the suite into ``out_dir``: ``<task>.jsonl`` / ``<task>.json`` files and the lm-eval
    task YAMLs (include ``out_dir`` in lm-eval's TaskManager). Deterministic in (seed, size)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sentences = _prose_sentences()
    _write_jsonl(out / f"{CLOZE}.jsonl", _cloze(sentences, size.cloze, random.Random(f"{seed}-{CLOZE}")))
    nli = _nli(sentences, size.nli_train + size.nli_test, random.Random(f"{seed}-{NLI}"))
    (out / f"{NLI}.json").write_text(json.dumps(
        {"labels": NLI_LABELS, "train": nli[:size.nli_train], "test": nli[size.nli_train:]}, indent=1))
    retrieval = _retrieval(size, random.Random(f"{seed}-{RETRIEVAL}"))
    (out / f"{RETRIEVAL}.json").write_text(json.dumps(retrieval, indent=1))
    # LM passages: the retrieval distractors' passages are prose that no other task uses.
    _write_jsonl(out / f"{LM}.jsonl", [{"text": t} for t in list(retrieval["corpus"].values())[-size.lm:]])
    (out / f"{CLOZE}.yaml").write_text(_lm_eval_yaml(CLOZE, out / f"{CLOZE}.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")))
    _write_jsonl(out / f"{CONTINUATION}.jsonl",
                 _continuations(sentences, size.continuation, random.Random(f"{seed}-{CONTINUATION}")))
    (out / f"{CONTINUATION}.yaml").write_text(_lm_eval_yaml(CONTINUATION, out / f"{CONTINUATION}.jsonl", (
        "output_type: generate_until\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: chrf\n    aggregation: chrf\n    higher_is_better: true\n"
        "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")))
    (out / f"{LM}.yaml").write_text(_lm_eval_yaml(LM, out / f"{LM}.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n    aggregation: weighted_perplexity\n"
        "    higher_is_better: false\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n")))
    return out
