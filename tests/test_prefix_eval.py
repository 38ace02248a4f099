"""A prefix LM evaluated as it was trained (lm-eval model ``ettin-prefix``), each reading checked against
transformers' own classes on exports of the same checkpoint: a context read as the prefix is what
ModernBertForMaskedLM computes over it; a text after [CLS] alone is what ModernBertDecoderForCausalLM
computes. Then the wiring: ``python -m ettin.eval RUN`` and ``python -m ettin.train pair=false
objective=prefix_lm`` score every offline task."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from ettin.evaluation.prefix_lm import PrefixLMHarness
from ettin.model.export import export_checkpoint

from test_export import make_run, tokenizer_dir  # noqa: F401

# One rope theta on every layer: transformers 4.x applies one theta to a decoder's layers.
THETAS = {"global_rope_theta": 10_000.0, "local_rope_theta": 10_000.0}
CONTEXTS = ["alpha beta gamma delta module", "print", "class return value import print list alpha beta"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):  # noqa: F811
    return make_run(tmp_path_factory.mktemp("prefix") / "run", tokenizer_dir, objective="prefix_lm", **THETAS)


@pytest.fixture(scope="module")
def views(run, tmp_path_factory):
    """The checkpoint exported as each transformers class: (encoder folder, decoder folder)."""
    out = tmp_path_factory.mktemp("views")
    return tuple(export_checkpoint(run, out / side, export_as=side) for side in ("encoder", "decoder"))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_context_is_read_bidirectionally_as_the_masked_lm_class_reads_it(views):
    encoder, _ = views
    reference = AutoModelForMaskedLM.from_pretrained(encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    lm = PrefixLMHarness(str(encoder), batch_size=2, device="cpu")
    requests, expected = [], []
    for text in CONTEXTS:
        context = encode(tokenizer, text)
        ids = torch.tensor([[tokenizer.cls_token_id, *context]])
        with torch.no_grad():  # the last prefix position predicts the first token after the prefix
            log_probs = torch.log_softmax(reference(input_ids=ids).logits[0, -1], -1)
        for token in (encode(tokenizer, " value")[0], int(log_probs.argmax())):
            requests.append(((text, "?"), [tokenizer.cls_token_id, *context], [token]))
            expected.append((float(log_probs[token]), token == int(log_probs.argmax())))
    got = lm._loglikelihood_tokens(requests)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    assert [score for score, _ in got] == pytest.approx([score for score, _ in expected], abs=1e-4)


@pytest.mark.parametrize("max_length", [64, 7])
def test_a_text_after_cls_alone_is_scored_as_the_decoder_class_scores_it(views, max_length):
    _, decoder = views
    reference = AutoModelForCausalLM.from_pretrained(decoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(decoder)
    lm = PrefixLMHarness(str(decoder), batch_size=2, device="cpu", max_length=max_length)
    expected = []
    for text in CONTEXTS:
        tokens, total = encode(tokenizer, text), 0.0
        for start in range(0, len(tokens), max_length - 1):  # windows of max_length - 1 after [CLS]
            ids = torch.tensor([[tokenizer.cls_token_id, *tokens[start:start + max_length - 1]]])
            with torch.no_grad():
                log_probs = torch.log_softmax(reference(input_ids=ids).logits[0, :-1], -1)
            total += float(log_probs.gather(1, ids[0, 1:, None]).sum())
        expected.append(total)
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(text,)) for text in CONTEXTS])
    assert got == pytest.approx(expected, abs=1e-4)


def test_every_continuation_token_is_read_after_the_prefix_as_the_checkpoint_model_reads_it(run, views):
    """Against the trained model itself, loaded from the checkpoint: one row, [CLS] context as the prefix,
    the continuation causal after it."""
    from ettin.model.export import load_checkpoint_model
    from ettin.store.checkpoints import latest_checkpoint

    encoder, _ = views
    model, _ = load_checkpoint_model(latest_checkpoint(run))
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    lm = PrefixLMHarness(str(encoder), batch_size=4, device="cpu")
    requests, expected = [], []
    for a in CONTEXTS:
        for b in (" value import print", " beta"):
            context, continuation = encode(tokenizer, a), encode(tokenizer, b)
            ids = torch.tensor([[tokenizer.cls_token_id, *context, *continuation]])
            with torch.no_grad():
                logits = model(ids, torch.ones_like(ids), prefix_lengths=torch.tensor([1 + len(context)])).logits
            read = torch.log_softmax(logits[0, len(context):-1], -1)
            expected.append(float(read.gather(1, torch.tensor(continuation)[:, None]).sum()))
            requests.append(((a, b), [tokenizer.cls_token_id, *context], continuation))
    batched = lm._loglikelihood_tokens(requests)
    assert [score for score, _ in batched] == pytest.approx(expected, abs=1e-4)
    alone = [lm._loglikelihood_tokens([request])[0] for request in requests]  # no padding
    assert [score for score, _ in alone] == pytest.approx(expected, abs=1e-4)


def test_a_row_longer_than_max_length_loses_its_oldest_tokens_after_cls(views):
    encoder, _ = views
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    short, whole = (PrefixLMHarness(str(encoder), device="cpu", max_length=n) for n in (6, 64))
    cls, context = tokenizer.cls_token_id, encode(tokenizer, CONTEXTS[2])
    continuation = context[:3]
    assert len(context) > 5
    # A long context keeps its last tokens; a continuation longer than the row is scored on its last five.
    got = short._loglikelihood_tokens([(("c", "x"), [cls, *context], continuation),
                                       (("c", "y"), [cls, *context[:2]], context)])
    expected = whole._loglikelihood_tokens([(("c", "x"), [cls, *context[-2:]], continuation),
                                            (("c", "y"), [cls], context[-5:])])
    assert [score for score, _ in got] == pytest.approx([score for score, _ in expected], abs=1e-5)


def test_generation_reads_the_prompt_as_the_prefix_and_stops_where_asked(views):
    encoder, _ = views
    reference = AutoModelForMaskedLM.from_pretrained(encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    lm = PrefixLMHarness(str(encoder), batch_size=2, device="cpu")
    first = []
    for text in CONTEXTS:
        ids = torch.tensor([[tokenizer.cls_token_id, *encode(tokenizer, text)]])
        with torch.no_grad():
            first.append(int(reference(input_ids=ids).logits[0, -1].argmax()))
    one = lm.generate_until([SimpleNamespace(args=(text, {"until": ["\n\n\n"], "max_gen_toks": 1}))
                             for text in CONTEXTS])
    assert one == [tokenizer.decode([token], skip_special_tokens=True) for token in first]
    # Each generated token is the greedy next token of prompt + tokens so far, the prompt as the prefix.
    produced, steps = {}, []
    next_tokens = lm._next_tokens

    def recording(prompts, so_far):
        steps.append(len(prompts))
        tokens = next_tokens(prompts, so_far)
        for prompt, token in zip(prompts, tokens):
            produced.setdefault(tuple(prompt), []).append(token)
        return tokens

    lm._next_tokens = recording
    several = lm.generate_until([SimpleNamespace(args=(text, {"until": ["\n\n\n"], "max_gen_toks": 4}))
                                 for text in CONTEXTS])
    assert all(text.startswith(start) for text, start in zip(several, one))
    prompts = [encode(tokenizer, text) for text in CONTEXTS]
    scored = lm._loglikelihood_tokens([((text, "?"), [tokenizer.cls_token_id, *prompt], produced[tuple(prompt)])
                                       for text, prompt in zip(CONTEXTS, prompts)])
    assert all(greedy for _, greedy in scored)
    # A stop string ends the request's generation where it appears.
    stop = one[0].strip()
    assert stop
    steps.clear()
    assert lm.generate_until([SimpleNamespace(args=(CONTEXTS[0], {"until": [stop], "max_gen_toks": 4}))]) == [""]
    assert len(steps) == 1


def test_a_prefix_lm_is_fine_tuned_bidirectionally_whatever_its_runs_export_as(tmp_path, tokenizer_dir, views):  # noqa: F811
    from ettin.evaluation.models import resolve_model
    from ettin.store.rundir import RunDir

    run = make_run(tmp_path / "run", tokenizer_dir, objective="prefix_lm", export_as="decoder", **THETAS)
    model = resolve_model(run)
    assert (model.kind, model.path, model.is_decoder) == ("prefix", RunDir(run).bidirectional_export(), False)
    # A folder given as such is fine-tuned as the class it loads as, and scored through ettin-prefix.
    _, decoder = views
    model = resolve_model(decoder)
    assert (model.kind, model.is_decoder) == ("prefix", True)


@pytest.mark.slow
def test_ettin_eval_scores_a_prefix_lm_run_on_every_offline_task(run, tmp_path):
    from ettin.evaluation import evaluate
    from ettin.store.rundir import RunDir

    report = evaluate([run], tasks="offline", out=tmp_path / "eval", limit=8)
    entry = report["models"][run.name]
    assert entry["kind"] == "prefix" and entry["objective"] == "prefix_lm"
    tasks = entry["tasks"]
    assert set(tasks) == {"smoke_cloze", "smoke_lm", "smoke_nli", "smoke_retrieval", "smoke_continuation"}
    for name in ("smoke_cloze", "smoke_lm", "smoke_continuation"):
        assert tasks[name]["model_args"]["model"] == "ettin-prefix"
    assert tasks["smoke_lm"]["metric"] == "word_perplexity"  # a causal reading: a decoder's perplexity
    # The fine-tuned tasks read the whole input as the prefix: the run exported as an encoder, aside.
    view = RunDir(run).bidirectional_export()
    assert entry["path"] == str(view) and not RunDir(run).export().exists()
    assert json.loads((view / "config.json").read_text())["ettin_objective"] == "prefix_lm"
    assert "Attention differs from training" in (view / "README.md").read_text()
    assert all(result["provenance"]["checkpoint"]["name"] == "pretrain-step0000010" for result in tasks.values())


@pytest.mark.slow
def test_train_pair_false_objective_prefix_lm_trains_and_scores_every_offline_task(tmp_path, capsys):
    from ettin.store.rundir import RunDir
    from ettin.train_command import main

    common = [f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}", "pair=false",
              "objective=prefix_lm", "phase_order=[pretrain]", "phases.pretrain.warmup_tokens=0",
              "trainer.num_workers=0"]
    assert main([*common, "run_name=evaluated", "phases.pretrain.tokens=6_000", "eval_limit=8"]) == 0
    run = RunDir(tmp_path / "runs" / "evaluated")
    report = json.loads((run.evaluation() / "eval.json").read_text())
    tasks = report["models"]["evaluated"]["tasks"]
    assert set(tasks) == {"smoke_cloze", "smoke_lm", "smoke_nli", "smoke_retrieval", "smoke_continuation"}
    assert all(result["limit"] == 8 and result["n_examples"] <= 8 for result in tasks.values())
    assert tasks["smoke_cloze"]["provenance"]["checkpoint"]["name"] == run.latest_checkpoint().name
    out = capsys.readouterr().out
    assert "prefix/prefix_lm" in out and f"scores: {run.evaluation() / 'eval.json'}" in out
    # Without eval_at_end a single run is trained only.
    assert main([*common, "run_name=trained", "phases.pretrain.tokens=2_000", "eval_at_end=false"]) == 0
    assert not RunDir(tmp_path / "runs" / "trained").evaluation().exists()
