"""ettin.eval on folders saved by plain transformers (not trained by us): the scorers against
independent computations, the offline suite's determinism, eval.json's schema, the table.

Models are tiny ModernBertForMaskedLM / ModernBertDecoderForCausalLM with a tiny tokenizer, saved
with save_pretrained. Nothing goes online (conftest sets the offline variables)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import (AutoTokenizer, ModernBertConfig, ModernBertDecoderConfig,
                          ModernBertDecoderForCausalLM, ModernBertForMaskedLM)

from ettin.data.tokenizer import set_objective_template, special_ids, train_tokenizer
from ettin.evaluation.registry import CATEGORIES
from ettin.evaluation import FORMAT, evaluate, smoke_tasks
from ettin.evaluation.models import EvalError
from ettin.evaluation.cli import format_table, main
from ettin.evaluation.masked_lm import MaskedLMHarness
from ettin.evaluation.models import resolve_model
from ettin.evaluation.registry import SMOKE_GRID
from ettin.evaluation.models import EvalModel
from ettin.evaluation.runners import RetrievalSettings, _pairs_text, finetune_classification, harness_model, retrieval_ndcg_at_10
from ettin.evaluation.uncertainty import load_examples, statistic

WORDS = "alpha beta gamma delta module function class return value import print list".split()
TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + "." for i in range(200)]
SHAPE = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
             global_attn_every_n_layers=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"encoder": folder, "decoder": folder}, each written by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer = train_tokenizer(TEXTS, 320, root / "tokenizer")
    ids = special_ids(tokenizer)
    specials = dict(pad_token_id=ids.pad, bos_token_id=ids.cls, eos_token_id=ids.sep, cls_token_id=ids.cls,
                    sep_token_id=ids.sep)
    torch.manual_seed(0)
    out = {}
    for kind, model in (
            ("encoder", ModernBertForMaskedLM(ModernBertConfig(local_attention=8, reference_compile=False,
                                                               **SHAPE, **specials))),
            ("decoder", ModernBertDecoderForCausalLM(ModernBertDecoderConfig(local_attention=8, **SHAPE,
                                                                             **specials)))):
        folder = root / f"tiny-{kind}"
        model.save_pretrained(folder)
        set_objective_template(tokenizer, causal=kind == "decoder")
        tokenizer.save_pretrained(str(folder))
        out[kind] = folder
    return out


def instance(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


# ------------------------------------------------------------------------------------------------
# The encoder's pseudo-causal scorer


class NextIdAtFirstMask(torch.nn.Module):
    """A stand-in masked LM with a known answer, laid out as ModernBertForMaskedLM (backbone ``model``,
    then ``decoder(head(hidden))``): at the first [MASK] of a row it is certain of (the token before
    it) + 1, read there (or one position to the left for an MNTP model). It checks what it is shown:
    the future is masks only, then [SEP]."""

    def __init__(self, mask: int, sep: int, vocab: int, extra_masks: int, predicts_next_token: bool):
        super().__init__()
        self.mask, self.sep, self.vocab, self.extra = mask, sep, vocab, extra_masks
        self.config = SimpleNamespace(max_position_embeddings=64, ettin_predicts_next_token=predicts_next_token)
        self.shift = int(predicts_next_token)
        self.head = self.decoder = torch.nn.Identity()

    def model(self, input_ids, attention_mask):
        hidden = torch.full((*input_ids.shape, self.vocab), -1e4)
        for b, row in enumerate(input_ids[:, :int(attention_mask.sum(1).max())]):
            length = int(attention_mask[b].sum())
            first = int((row == self.mask).nonzero()[0])
            assert row[first:length - 1].tolist() == [self.mask] * (1 + self.extra)  # no future leaks
            assert int(row[length - 1]) == self.sep
            hidden[b, first - self.shift, int(row[first - 1]) + 1] = 0.0
        return SimpleNamespace(last_hidden_state=hidden)


@pytest.mark.parametrize("predicts_next_token", [False, True], ids=["mlm", "mntp"])
def test_encoder_scorer_on_a_case_where_the_answer_is_known(folders, predicts_next_token):
    tokenizer = AutoTokenizer.from_pretrained(folders["encoder"])
    ids = special_ids(tokenizer)
    lm = MaskedLMHarness(NextIdAtFirstMask(ids.mask, ids.sep, 320, 2, predicts_next_token), tokenizer=tokenizer,
                         batch_size=3)
    (right, right_greedy), (wrong, wrong_greedy), (empty, _) = lm._loglikelihood_tokens([
        (("", ""), [ids.cls, 40, 41], [42, 43, 44]),  # each token is (previous + 1): certain
        (("", ""), [40, 41], [42, 50]),  # the second token is not
        (("", ""), [ids.cls], [ids.cls + 1]),  # empty context: only the prefix token before it
    ])
    assert right == pytest.approx(0.0, abs=1e-6) and right_greedy
    assert wrong < -1000 and not wrong_greedy
    assert empty == pytest.approx(0.0, abs=1e-6)
    context = tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    generated = lm.generate_until([instance("generate_until", "alpha beta", {"until": ["\n\n"], "max_gen_toks": 3})])
    assert generated == [tokenizer.decode([context[-1] + 1, context[-1] + 2, context[-1] + 3])]
    from lm_eval.api.registry import get_model

    assert get_model("ettin-mlm") is MaskedLMHarness  # lm_eval.simple_evaluate(model="ettin-mlm", ...)


def manual_pseudo_causal(model, tokenizer, context: str, continuation: str, extra_masks: int) -> float:
    """Independent reference: [CLS] context continuation[:i] [MASK]x(1+extra) [SEP], one row at a time."""
    ids = special_ids(tokenizer)
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    past = tokenizer(context, add_special_tokens=False)["input_ids"]
    total = 0.0
    for i in range(len(past), len(whole)):
        row = torch.tensor([[ids.cls, *whole[:i], *[ids.mask] * (1 + extra_masks), ids.sep]])
        with torch.no_grad():
            logits = model(input_ids=row).logits[0, i + 1]
        total += float(torch.log_softmax(logits, -1)[whole[i]])
    return total


def test_encoder_scores_equal_an_independent_computation(folders):
    reference = ModernBertForMaskedLM.from_pretrained(folders["encoder"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["encoder"])
    lm = harness_model(EvalModel("tiny-encoder", folders["encoder"], "encoder", None, 0), batch_size=2)
    pairs = [("alpha beta gamma", " delta module"), ("print the", " value list return")]
    scores = lm.loglikelihood([instance("loglikelihood", *p) for p in pairs])
    for (context, continuation), (score, _) in zip(pairs, scores):
        assert score == pytest.approx(manual_pseudo_causal(reference, tokenizer, context, continuation, 2), abs=1e-4)
    # pseudo-log-likelihood: each token masked alone, everything else visible
    text = "alpha beta gamma delta."
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = special_ids(tokenizer)
    expected = 0.0
    for j, token in enumerate(tokens):
        row = torch.tensor([[ids.cls, *tokens[:j], ids.mask, *tokens[j + 1:], ids.sep]])
        with torch.no_grad():
            expected += float(torch.log_softmax(reference(input_ids=row).logits[0, j + 1], -1)[token])
    assert lm.loglikelihood_rolling([instance("loglikelihood_rolling", text)])[0] == pytest.approx(expected, abs=1e-4)


def test_decoder_loglikelihood_through_lm_eval_is_the_sum_of_next_token_log_probs(folders):
    reference = ModernBertDecoderForCausalLM.from_pretrained(folders["decoder"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(folders["decoder"])
    lm = harness_model(EvalModel("tiny-decoder", folders["decoder"], "decoder", None, 0), batch_size=2)
    context, continuation = "alpha beta gamma", " delta module"
    (score, _), = lm.loglikelihood([instance("loglikelihood", context, continuation)])
    whole = tokenizer(context + continuation)["input_ids"]  # [CLS] (BOS) first, no EOS
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        log_probs = torch.log_softmax(reference(input_ids=torch.tensor([whole])).logits[0], -1)
    assert whole[0] == tokenizer.cls_token_id
    assert score == pytest.approx(sum(float(log_probs[i - 1, whole[i]]) for i in range(start, len(whole))), abs=1e-4)


# ------------------------------------------------------------------------------------------------
# The offline suite


def test_offline_suite_is_deterministic_and_seeded(tmp_path):
    size = smoke_tasks.SuiteSize.limited(6)
    first, again, other = (smoke_tasks.generate(tmp_path / name, seed=seed, size=size)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    data_files = sorted(p.name for p in first.iterdir() if p.suffix != ".yaml")
    assert data_files == ["smoke_cloze.jsonl", "smoke_continuation.jsonl", "smoke_lm.jsonl", "smoke_nli.json",
                          "smoke_retrieval.json"]
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in data_files)
    assert all((first / f).read_bytes() != (other / f).read_bytes() for f in data_files)
    nli = json.loads((first / "smoke_nli.json").read_text())
    assert (len(nli["train"]), len(nli["test"])) == (24, 6)
    assert sorted(r["label"] for r in nli["train"] + nli["test"]) == [0] * 10 + [1] * 10 + [2] * 10
    for row in nli["train"]:
        if row["label"] == 0:  # entailment: a span of the premise
            assert f" {row['hypothesis']} " in f" {row['premise']} "
        if row["label"] == 2:  # contradiction: a negation added or removed
            assert ("not" in row["hypothesis"].split()) != ("not" in row["premise"].split()) or \
                row["hypothesis"] not in row["premise"]
    cloze = [json.loads(line) for line in (first / "smoke_cloze.jsonl").read_text().splitlines()]
    assert len(cloze) == 6 and all(len(set(r["choices"])) == 4 for r in cloze)


# ------------------------------------------------------------------------------------------------
# Retrieval and classification against known answers


def test_retrieval_ndcg_on_hand_made_rankings(folders, tmp_path):
    passages = ["alpha beta gamma delta.", "module function class.", "return value import.", "print list alpha."]
    corpus = {f"d{i}": p for i, p in enumerate(passages)}
    queries = {f"q{i}": p for i, p in enumerate(passages)}  # each query is its own passage: rank 1
    model = EvalModel("tiny-encoder", folders["encoder"], "encoder", None, 0)
    settings = RetrievalSettings(batch_size=4)
    perfect, per_query = retrieval_ndcg_at_10(model, [], queries, corpus, {f"q{i}": [f"d{i}"] for i in range(4)},
                                              settings=settings, seed=0, work_dir=tmp_path)
    assert perfect == pytest.approx(1.0) and per_query == {f"q{i}": pytest.approx(1.0) for i in range(4)}
    # q0's relevant passage is q1's twin: ranked below d0, so nDCG@10 = 1 / log2(rank + 1) < 1
    shifted, per_query = retrieval_ndcg_at_10(model, [], {"q0": passages[0]}, corpus, {"q0": ["d1"]},
                                              settings=settings, seed=0, work_dir=tmp_path)
    assert shifted in [pytest.approx(1 / torch.log2(torch.tensor(r + 1.0)).item()) for r in (2, 3, 4)]
    assert per_query == {"q0": pytest.approx(shifted)}  # the score is the mean of the per-query values


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_sentence_pairs_are_separated_by_sep_for_both_kinds(folders, kind):
    """A decoder's pair template has no separator; the pair must not run together."""
    tokenizer = AutoTokenizer.from_pretrained(folders[kind])
    first, second = _pairs_text(EvalModel(kind, folders[kind], kind, None, 0), tokenizer, ["alpha beta"], ["gamma"])
    ids = tokenizer(first, second)["input_ids"][0]
    alpha = tokenizer("alpha beta", add_special_tokens=False)["input_ids"]
    sep = tokenizer.sep_token_id
    assert ids[:len(alpha) + 2] == [tokenizer.cls_token_id, *alpha, sep]
    assert tokenizer.decode(ids[len(alpha) + 2:], skip_special_tokens=True).strip() == "gamma"
    assert ids.count(sep) == (2 if kind == "encoder" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_classification_fine_tuning_learns_a_trivial_task(folders, tmp_path, kind):
    """The label is the repeated word, the length varies (padding on either side must not matter)."""
    rows = [{"text": " ".join([WORDS[i % 3]] * (1 + i % 5)), "label": i % 3} for i in range(48)]
    model = EvalModel(f"tiny-{kind}", folders[kind], kind, None, 0)
    predictions = []
    setting = {**SMOKE_GRID.settings()[0], "learning_rate": 3e-3, "epochs": 6, "batch_size": 8}
    tried = finetune_classification(model, rows[:36], rows[36:], num_labels=3, seed=0, work_dir=tmp_path,
                                    settings=[setting], score=lambda p: predictions.append(p) or 0.5)
    assert predictions == [[r["label"] for r in rows[36:]]]
    assert tried == [{**setting, "score": 0.5}]


# ------------------------------------------------------------------------------------------------
# evaluate(), eval.json and the command line


TASK_KEYS = {"category", "metric", "score", "higher_is_better", "smoke", "n_examples", "library", "library_version",
             "split", "few_shot", "seed", "limit", "source", "seconds"}


@pytest.mark.slow
def test_evaluate_writes_the_eval_json_schema_for_an_encoder_and_a_decoder(folders, tmp_path):
    report = evaluate([folders["encoder"], folders["decoder"]], out=tmp_path, limit=4)
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert set(report) == {"format", "suite", "created", "models"}
    assert (report["format"], report["suite"]) == (FORMAT, "offline")
    assert list(report["models"]) == ["tiny-encoder", "tiny-decoder"]
    for name, kind in (("tiny-encoder", "encoder"), ("tiny-decoder", "decoder")):
        entry = report["models"][name]
        assert set(entry) == {"path", "kind", "objective", "parameters", "ettin_size", "tasks"}
        assert (entry["kind"], entry["objective"]) == (kind, None)  # not made by ettin
        hf = (ModernBertForMaskedLM if kind == "encoder" else ModernBertDecoderForCausalLM).from_pretrained(
            folders[kind])
        assert entry["parameters"] == hf.num_parameters()
        assert list(entry["tasks"]) == list(smoke_tasks.TASKS)
        for task, result in entry["tasks"].items():
            assert TASK_KEYS <= set(result) and result["category"] in CATEGORIES
            assert result["smoke"] is True and result["n_examples"] == 4
            assert isinstance(result["score"], float)
        lm = entry["tasks"]["smoke_lm"]
        assert lm["metric"] == ("word_perplexity" if kind == "decoder" else "pseudo_word_perplexity")
        assert lm["higher_is_better"] is False and lm["score"] > 1
        assert 0 <= entry["tasks"]["smoke_cloze"]["score"] <= 1
        for task, result in entry["tasks"].items():  # every score with its error, its examples beside eval.json
            examples = load_examples(tmp_path / result["per_example"])
            assert list(examples["index"]) == [0, 1, 2, 3]
            assert statistic(examples) == pytest.approx(result["score"], rel=1e-6)
            assert result["ci95"][0] <= result["score"] <= result["ci95"][1] and result["stderr"] >= 0
        cloze = entry["tasks"]["smoke_cloze"]
        p = cloze["score"]  # lm-eval's mean_stderr: the binomial one with n-1 (sqrt(p(1-p)/(n-1)))
        assert "lm-eval mean_stderr formula" in cloze["stderr_method"]
        assert cloze["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 3), abs=1e-12)
        assert "bootstrap" in entry["tasks"]["smoke_lm"]["stderr_method"]
    table = format_table(report)
    lines = table.splitlines()
    assert "tiny-encoder" in lines[0] and "tiny-decoder" in lines[0]
    assert sum(line.startswith("smoke_") and " *" in line for line in lines) == len(smoke_tasks.TASKS)  # every smoke task is marked
    assert "smoke task" in lines[-1]


def test_a_run_directory_is_evaluated_through_its_export(tmp_path):
    from test_export import make_run

    tokenizer = tmp_path / "tokenizer"
    train_tokenizer(TEXTS, 320, tokenizer)
    run = make_run(tmp_path / "my-run", tokenizer, objective="mntp")
    model = resolve_model(run)
    assert (model.name, model.kind, model.objective, model.path) == ("my-run", "encoder", "mntp", run / "hf")
    assert (run / "hf" / "config.json").exists()


@pytest.mark.slow
def test_the_command_line_prints_a_table_and_refuses_what_it_cannot_run(folders, tmp_path, capsys):
    assert main([str(folders["decoder"]), "--tasks", "smoke_cloze", "--limit", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smoke_cloze *" in out and "tiny-decoder" in out and str(tmp_path / "eval.json") in out
    assert json.loads((tmp_path / "eval.json").read_text())["suite"] == "custom"
    assert main([str(folders["decoder"]), "--tasks", "hellaswag", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # a dataset missing from the offline cache: its id and the prefetch command
    assert "'Rowan/hellaswag'" in err and "python -m ettin.eval --prefetch --tasks hellaswag" in err
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(EvalError, match="called 'tiny-decoder'"):
        evaluate([folders["decoder"], folders["decoder"]], tasks="smoke_cloze", limit=4)


def test_a_runs_checkpoints_are_selected_exported_once_and_named(tmp_path):
    import shutil

    from test_export import make_run

    from ettin.store.checkpoints import META
    from ettin.evaluation.models import resolve_models

    tokenizer = tmp_path / "tokenizer"
    train_tokenizer(TEXTS, 320, tokenizer)
    run = make_run(tmp_path / "my-run", tokenizer, objective="clm")
    for step in (20, 30, 40):  # three more checkpoints of the same weights, later in the run
        folder = run / "checkpoints" / f"pretrain-step{step:07d}"
        shutil.copytree(run / "checkpoints" / "pretrain-step0000010", folder)
        meta = json.loads((folder / META).read_text())
        (folder / META).write_text(json.dumps({**meta, "step": step, "tokens": 100 * step}))
    names = lambda selection: [m.name for m in resolve_models([run], selection)]  # noqa: E731
    assert names("every:2") == ["my-run@pretrain-step0000010", "my-run@pretrain-step0000030",
                                "my-run@pretrain-step0000040"]  # the first, every 2nd, and the last
    assert names("pretrain-step0000020") == ["my-run@pretrain-step0000020"]
    assert len(names("all")) == 4 and sorted(p.name for p in (run / "hf-checkpoints").iterdir()) == [
        f"pretrain-step{s:07d}" for s in (10, 20, 30, 40)]
    model = resolve_models([run], "pretrain-step0000040")[0]
    assert (model.kind, model.objective) == ("decoder", "clm")
    assert model.path == run / "hf-checkpoints" / "pretrain-step0000040"
    with pytest.raises(EvalError, match="no checkpoint 'pretrain-step0000050'; did you mean pretrain-step0000040"):
        resolve_models([run], "pretrain-step0000050")
    with pytest.raises(EvalError, match="K must be a whole number"):
        resolve_models([run], "every:0")
