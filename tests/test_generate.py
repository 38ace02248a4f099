"""Generation by iterative unmasking (ettin.evaluation.generation, python -m ettin.generate): with a
model whose predictions are fixed, the tokens come back in the order the remasking rule says; an
MDLM export loaded by plain transformers generates what ettin's own model generates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import ModernBertForMaskedLM

from ettin.evaluation.generation import GenerationSettings, Unmasker, unmask, unmask_counts
from ettin.model.hub import save_hf
from ettin.model.modernbert import ModernBert

from data_fixtures import data_root, tiny_tokenizer  # noqa: F401 (fixtures)
from test_model import make_loud, model_config

MASK, CLS, SEP, V = 3, 1, 2, 50
PROMPT = [11, 12]
LENGTH = 6
START = 1 + len(PROMPT)
# Position START + i predicts token 20 + i with probability rising with CONFIDENCE[i].
CONFIDENCE = [0.3, 0.9, 0.1, 0.6, 0.8, 0.2]


def fixed_logits(ids: torch.Tensor) -> torch.Tensor:
    """Whatever the input: position START + i proposes 20 + i, with CONFIDENCE[i] as its softmax
    probability (the rest spread evenly), other positions propose token 5."""
    logits = torch.zeros(len(ids), V)
    logits[:, 5] = 5.0
    for i, c in enumerate(CONFIDENCE):
        rest = (1 - c) / (V - 1)
        logits[START + i] = np.log(rest)
        logits[START + i, 20 + i] = np.log(c)
    return logits


def unmasking_order(settings: GenerationSettings) -> tuple[list[int], list[list[int]]]:
    """(the generated ids, the positions unmasked at each step)."""
    states = []
    ids = unmask(fixed_logits, PROMPT, mask_id=MASK, cls_id=CLS, sep_id=SEP, never=(0,),
                 settings=settings, on_step=states.append)
    before = [torch.tensor([CLS, *PROMPT] + [MASK] * LENGTH + [SEP]), *states]
    steps = [((a == MASK) & (b != MASK)).nonzero().squeeze(1).sub(START).tolist()
             for a, b in zip(before[:-1], before[1:])]
    return ids, steps


def test_low_confidence_unmasks_the_most_confident_first():
    ids, steps = unmasking_order(GenerationSettings(length=LENGTH, steps=LENGTH))
    assert ids == [20 + i for i in range(LENGTH)]
    assert steps == [[1], [4], [3], [0], [5], [2]]  # CONFIDENCE in decreasing order


def test_low_confidence_fills_blocks_left_to_right_and_spreads_the_steps():
    ids, steps = unmasking_order(GenerationSettings(length=LENGTH, steps=4, block_length=3))
    assert ids == [20 + i for i in range(LENGTH)]
    # Two blocks of 3 with 2 steps each: 2 then 1 unmasked; block 0 = {0, 1, 2} before block 1.
    assert steps == [[0, 1], [2], [3, 4], [5]]
    assert unmask_counts(7, 3) == [3, 2, 2]


def test_random_remasking_ignores_confidence_and_repeats_under_a_seed():
    first = []
    for seed in range(300):
        ids, steps = unmasking_order(GenerationSettings(length=LENGTH, steps=LENGTH, remasking="random",
                                                        seed=seed))
        assert ids == [20 + i for i in range(LENGTH)] and sorted(sum(steps, [])) == list(range(LENGTH))
        first.append(steps[0][0])
    assert unmasking_order(GenerationSettings(length=LENGTH, steps=LENGTH, remasking="random", seed=7)) \
        == unmasking_order(GenerationSettings(length=LENGTH, steps=LENGTH, remasking="random", seed=7))
    # The first position is uniform over the 6, whatever its confidence: each count is
    # Binomial(300, 1/6), mean 50, sd 6.5; 4 sd either side.
    counts = np.bincount(first, minlength=LENGTH)
    assert (np.abs(counts - 50) < 26).all(), counts


def test_temperature_samples_and_stays_reproducible():
    settings = GenerationSettings(length=LENGTH, steps=LENGTH, temperature=5.0, seed=3)
    a, _ = unmasking_order(settings)
    assert a == unmasking_order(settings)[0]
    draws = {tuple(unmasking_order(GenerationSettings(length=LENGTH, steps=LENGTH, temperature=5.0,
                                                      seed=s))[0]) for s in range(20)}
    assert len(draws) > 1  # a sample, not the argmax


def test_settings_that_cannot_generate_are_refused():
    with pytest.raises(ValueError, match="remasking"):
        GenerationSettings(remasking="topk")
    with pytest.raises(ValueError, match="one step per block"):
        GenerationSettings(length=32, steps=2, block_length=8)


@pytest.fixture
def mdlm_export(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    config = model_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                          mask_token_id=tokenizer.mask_token_id, num_hidden_layers=3,
                          global_attn_every_n_layers=2, window=4)
    model = make_loud(ModernBert(config), weight_std=0.1).eval()
    folder = tmp_path / "mdlm-export"
    save_hf(model, folder, objective="mdlm")
    for file in tiny_tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_an_mdlm_export_in_plain_transformers_generates_what_ettin_generates(mdlm_export, remasking):
    assert json.loads((mdlm_export / "config.json").read_text())["ettin_generation"]["remasking"] \
        == "low_confidence"
    ours = Unmasker.load(mdlm_export)
    theirs = Unmasker(ModernBertForMaskedLM.from_pretrained(mdlm_export).eval(), ours.tokenizer,
                      ours.defaults)
    settings = ours.settings(length=12, steps=6, block_length=4, remasking=remasking, temperature=0.7,
                             seed=5)
    text = ours.generate("The module", settings)
    assert text == theirs.generate("The module", settings)
    assert ours.generate("The module", settings) == text  # the same seed, the same text


def test_the_bound_harness_scores_a_continuation_against_its_hand_expectation(mdlm_export):
    """One token: the bound is exact (log p of it at its [MASK]); two tokens: the mean over draws
    approaches the bound's expectation computed by hand, within 4 standard errors."""
    from ettin.evaluation.diffusion_lm import DiffusionLMHarness

    lm = DiffusionLMHarness(str(mdlm_export), samples=400, device="cpu")
    model, t = lm.model, lm.tokenizer
    context, (a, b) = t("The module", add_special_tokens=False)["input_ids"], (40, 77)

    def log_p(ids, position, token):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, position]
        return float(torch.log_softmax(logits.double(), -1)[token])

    row = [t.cls_token_id, *context]
    (one, stderr), = lm.bound([(context, [a])])
    assert one == pytest.approx(log_p(row + [t.mask_token_id, t.sep_token_id], len(row), a), abs=1e-5)
    assert stderr == 0.0
    m, sep, p = t.mask_token_id, t.sep_token_id, len(row)
    single = (log_p(row + [m, b, sep], p, a) + log_p(row + [a, m, sep], p + 1, b)) / 2 * 2  # l = 1, weight 2
    both = log_p(row + [m, m, sep], p, a) + log_p(row + [m, m, sep], p + 1, b)  # l = 2, weight 1
    (two, stderr), = lm.bound([(context, [a, b])])
    assert abs(two - (single + both) / 2) < 4 * stderr
