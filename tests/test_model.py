"""Exactness of ettin.model.modernbert.ModernBert: sizes, transformers parity, masks, packing, labels, dtypes, init.

Everything runs on CPU in fp32 with tiny models. Weights are "loud" (architecture.md section 10): with
the default 0.02 init a wrong window moves logits by ~1e-4, with these by O(1), so every comparison
below fails on a wrong mask, window, RoPE theta or layer pattern.

Tolerance for fp32 comparisons of two different kernels (ours vs transformers, sdpa vs eager, band vs
grid, packed vs alone): |diff| <= 1e-5 * max(1, max |logit|) plus 1e-5 relative. The kernels sum in
different orders; observed at most 6e-6 of the logit scale (7.7e-5 at max |logit| 12.9; ours eager vs
transformers eager: 0.0).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import (ModernBertConfig, ModernBertDecoderConfig, ModernBertDecoderForCausalLM,
                          ModernBertForMaskedLM)

import ettin.model.modernbert
from ettin.model.config import SIZES, ModelConfig, model_config
from ettin.model.hub import convert_state_dict
from ettin.model.modernbert import IGNORE_INDEX, Layout, ModernBert, attend, rope_cos_sin

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

VOCAB = 97
PAD = 0
LOUD_STD = 0.4
# Half as loud where fp32 (gradients) or bf16 rounding through near-tied softmax rows would dominate.
MODERATE_STD = 0.2
BACKENDS = ("sdpa", "eager", "flex")  # flash is GPU-only; see test_flash_without_flash_attn_says_how_to_fix

# Two layer patterns, each with global and sliding layers and windows much shorter than the
# sequences, global and local theta different (and not the defaults) so that theta routing matters.
GLOBAL_SLIDING_SLIDING_GLOBAL = dict(num_hidden_layers=4, global_attn_every_n_layers=3, window=4,
                                     global_rope_theta=500.0, local_rope_theta=20.0)
GLOBAL_SLIDING_GLOBAL_WITH_BIASES = dict(num_hidden_layers=3, global_attn_every_n_layers=2, window=3,
                                         global_rope_theta=40.0, local_rope_theta=3000.0,
                                         attention_bias=True, mlp_bias=True, norm_bias=True, head_bias=True)
LAYER_PATTERNS = {"GSSG": GLOBAL_SLIDING_SLIDING_GLOBAL, "GSG-biases": GLOBAL_SLIDING_GLOBAL_WITH_BIASES}

# Row lengths of padded batches: ragged with a row of length 1; heavily padded (most of the grid is
# padding); short rows where sdpa's sliding layers use the grid, not the band (asserted below).
RAGGED = [20, 13, 6, 1]
HEAVILY_PADDED = [1, 3, 40, 2, 1]
SHORT = [14, 11]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine contending threads
    made this file 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, mask_token_id=3,
                  **GLOBAL_SLIDING_SLIDING_GLOBAL)
    return model_config("tiny", **{**fields, **overrides})


def make_loud(model: torch.nn.Module, seed: int = 0, weight_std: float = LOUD_STD) -> torch.nn.Module:
    """Weights N(0, weight_std^2), norm weights 1 + 0.2 N(0, 1), biases 0.5 N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.5 * noise)
            else:
                param.copy_(weight_std * noise)
    return model


def loud_model(weight_std: float = LOUD_STD, **overrides) -> ModernBert:
    return make_loud(ModernBert(tiny_config(**overrides)), weight_std=weight_std).eval()


def padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids (real tokens never the pad id) and attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(4, VOCAB, (len(lengths), width), generator=generator)
    return ids.masked_fill(mask == 0, PAD), mask


def cu_seqlens_of(lengths: list[int]) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def flat_documents(lengths: list[int], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed stream: flat input_ids [N] and cu_seqlens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (sum(lengths),), generator=generator), cu_seqlens_of(lengths)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    """|diff| <= tolerance * (max(1, max |expected|) + |expected|): see the module docstring."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------
# Sizes


# Unique parameters (tied embedding counted once) of every Ettin size, as published: the size table's
# own column (architecture.md section 8.1), so a new size is one row there.
PARAMETER_COUNTS = {name: row.parameters for name, row in SIZES.items() if row.parameters}


@pytest.mark.parametrize("size", list(PARAMETER_COUNTS))
def test_parameter_count(size):
    with torch.device("meta"):
        model = ModernBert(model_config(size))
    assert model.num_parameters() == PARAMETER_COUNTS[size]
    # The names are the counts rounded: 16.9M, 32.1M, 68.5M, 149.7M, 395.9M, 1031.3M.
    assert round(model.num_parameters() / 1e6, 1) == round(PARAMETER_COUNTS[size] / 1e6, 1)
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight


def test_every_size_ettins_recipes_train_has_a_published_count():
    from omegaconf import OmegaConf

    from ettin import RECIPES_DIR

    ettin_sizes = {OmegaConf.load(recipe).size for recipe in RECIPES_DIR.glob("*.yaml")
                   if not recipe.stem.startswith("smoke")}
    assert ettin_sizes == set(PARAMETER_COUNTS)


# ------------------------------------------------------------------------------------------------
# Parity with transformers (ModernBertForMaskedLM; ModernBertDecoderForCausalLM for causal mode)


def hf_encoder_config(config: ModelConfig) -> ModernBertConfig:
    """Our window is one side of the query; transformers' local_attention is both sides."""
    return ModernBertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        global_attn_every_n_layers=config.global_attn_every_n_layers, local_attention=2 * config.window,
        global_rope_theta=config.global_rope_theta, local_rope_theta=config.local_rope_theta,
        norm_eps=config.norm_eps, norm_bias=config.norm_bias, attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias, classifier_bias=config.head_bias, decoder_bias=config.decoder_bias,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        cls_token_id=config.bos_token_id, sep_token_id=config.eos_token_id, reference_compile=False)


def encoder_pair(config: ModelConfig, hf_attention: str) -> tuple[ModernBert, ModernBertForMaskedLM]:
    hf = ModernBertForMaskedLM._from_config(hf_encoder_config(config), attn_implementation=hf_attention)
    make_loud(hf).eval()
    ours = ModernBert(config).eval()
    ours.load_state_dict(hf.state_dict())  # strict: the key sets are equal
    return ours, hf


def test_parity_batches_cover_both_sdpa_paths_for_sliding_layers():
    def uses_band(lengths, window):
        return Layout(cu_seqlens_of(lengths), max(lengths), False, window).use_band()

    for pattern in LAYER_PATTERNS.values():
        assert uses_band(RAGGED, pattern["window"]) and uses_band(HEAVILY_PADDED, pattern["window"])
        assert not uses_band(SHORT, pattern["window"])
        assert 2 * pattern["window"] + 1 < max(SHORT)  # the window is narrower than the sequence


@pytest.mark.slow
@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", list(LAYER_PATTERNS))
def test_encoder_matches_transformers(pattern, backend, hf_attention):
    ours, hf = encoder_pair(tiny_config(attn_implementation=backend, **LAYER_PATTERNS[pattern]), hf_attention)
    for lengths in (RAGGED, HEAVILY_PADDED, SHORT):
        ids, mask = padded_batch(lengths)
        with torch.no_grad():  # flex has no backward on CPU
            expected = hf(input_ids=ids, attention_mask=mask).logits
            logits = ours(ids, mask).logits
        real = mask.bool()
        assert_logits_close(logits[real], expected[real])
        assert (logits[~real] == 0).all()  # pad positions are re-padded with zeros


@pytest.mark.parametrize(
    "mistake",
    [dict(window=GLOBAL_SLIDING_SLIDING_GLOBAL["window"] - 1),
     dict(global_rope_theta=GLOBAL_SLIDING_SLIDING_GLOBAL["local_rope_theta"],
          local_rope_theta=GLOBAL_SLIDING_SLIDING_GLOBAL["global_rope_theta"]),
     dict(global_attn_every_n_layers=2)],
    ids=["window", "theta", "layer-pattern"])
def test_parity_test_detects_a_wrong_model(mistake):
    """The negative control: the parity comparison above tells a wrong window, theta or pattern."""
    _, hf = encoder_pair(tiny_config(), "eager")
    wrong = ModernBert(tiny_config(**mistake)).eval()
    wrong.load_state_dict(hf.state_dict())
    ids, mask = padded_batch(RAGGED)
    with torch.no_grad():
        difference = max_difference(wrong(ids, mask).logits[mask.bool()],
                                    hf(input_ids=ids, attention_mask=mask).logits[mask.bool()])
    assert difference > 0.1


@pytest.mark.parametrize("hf_attention", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_matches_transformers_decoder(backend, hf_attention):
    """causal=True is transformers' ModernBERT decoder, whose sliding window counts the query itself:
    our window W (W previous tokens + self) is its sliding_window = W + 1 = local_attention // 2.
    transformers 4.x decoders use the global theta on every layer, so both thetas are equal here."""
    config = tiny_config(attn_implementation=backend,
                         local_rope_theta=GLOBAL_SLIDING_SLIDING_GLOBAL["global_rope_theta"])
    ours = make_loud(ModernBert(config)).eval()
    hf_config = ModernBertDecoderConfig(
        vocab_size=VOCAB, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        global_attn_every_n_layers=config.global_attn_every_n_layers, local_attention=2 * (config.window + 1),
        global_rope_theta=config.global_rope_theta, local_rope_theta=config.local_rope_theta,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    hf = ModernBertDecoderForCausalLM._from_config(hf_config, attn_implementation=hf_attention).eval()
    hf.load_state_dict(convert_state_dict(ours.state_dict(), to="decoder"), strict=False)  # tied decoder.weight
    for lengths in (RAGGED, SHORT):
        ids, mask = padded_batch(lengths)
        with torch.no_grad():
            expected = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = ours(ids, mask, causal=True).logits
        assert_logits_close(logits[mask.bool()], expected[mask.bool()])


def test_flash_without_flash_attn_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` raise ImportError
    with pytest.raises(ImportError, match=r"flash-attn.*attn_implementation='sdpa'"):
        ModernBert(tiny_config(attn_implementation="flash"))


def test_flex_refuses_backward_on_cpu():
    model = ModernBert(tiny_config(attn_implementation="flex"))
    ids, mask = padded_batch(SHORT)
    with pytest.raises(NotImplementedError, match="no backward pass on CPU"):
        model(ids, mask)


# ------------------------------------------------------------------------------------------------
# Masks: who sees whom, for every backend, on packed streams


def expected_visibility(lengths: list[int], causal: bool, window) -> torch.Tensor:
    """[N, N]: query i sees key j. Same document; causal: j not after i; window: |pos_i - pos_j| <= W
    (causal: the W previous tokens and the query itself)."""
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths])
    visible = document[:, None] == document[None, :]
    if causal:
        visible &= position[None, :] <= position[:, None]
    if window is not None:
        visible &= (position[:, None] - position[None, :]).abs() <= window
    return visible


def observed_visibility(qkv: torch.Tensor, layout: Layout, sliding: bool, backend: str) -> torch.Tensor:
    """[N, N]: whether moving the key and value of token j changes the attention output of token i."""
    base = attend(qkv, layout, sliding, backend, 0.0)
    seen = torch.zeros(len(qkv), len(qkv), dtype=torch.bool)
    for j in range(len(qkv)):
        moved = qkv.clone()
        moved[j, 1:] += 1.0
        seen[:, j] = (attend(moved, layout, sliding, backend, 0.0) - base).abs().amax(dim=(1, 2)) > 1e-6
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "window,lengths,band",
    [(3, [1, 9, 14, 4], True),  # documents shorter and longer than the window, across band blocks
     (3, [6, 8], False),
     (0, [5, 1, 7], True)])
def test_attention_sees_exactly_its_document_and_window(backend, causal, window, lengths, band):
    layout = Layout(cu_seqlens_of(lengths), max(lengths), causal, window)
    assert layout.use_band() == band  # sdpa's sliding layers: band_attention or the grid
    qkv = torch.randn(sum(lengths), 3, 2, 16, generator=torch.Generator().manual_seed(0))
    for sliding in (False, True):
        observed = observed_visibility(qkv, layout, sliding, backend)
        expected = expected_visibility(lengths, causal, window if sliding else None)
        assert torch.equal(observed, expected), f"sliding={sliding}"


def test_positions_restart_per_document():
    layout = Layout(cu_seqlens_of([3, 1, 4]), 4, False, 2)
    assert layout.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert layout.sequence.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]


def test_rope_is_applied_at_positions_within_the_document(monkeypatch):
    """RoPE is relative, so outputs cannot show the position offset: check the angles used."""
    used = []
    original = ettin.model.modernbert.rope_cos_sin

    def spy(positions, dim, theta):
        used.append(positions.tolist())
        return original(positions, dim, theta)

    monkeypatch.setattr(ettin.model.modernbert, "rope_cos_sin", spy)
    ids, cu_seqlens = flat_documents([3, 5])
    ModernBert(tiny_config())(ids, cu_seqlens=cu_seqlens)
    assert used and all(positions == [0, 1, 2, 0, 1, 2, 3, 4] for positions in used)


# ------------------------------------------------------------------------------------------------
# Padded, flat and packed inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_flat_input_equals_padded(backend, causal):
    model = loud_model(attn_implementation=backend)
    ids, mask = padded_batch(RAGGED)
    flat_ids = ids[mask.bool()]
    with torch.no_grad():
        padded = model(ids, mask, causal=causal).logits
        flat = model(flat_ids, cu_seqlens=cu_seqlens_of(RAGGED), max_seqlen=max(RAGGED), causal=causal).logits
        flat_without_max = model(flat_ids, cu_seqlens=cu_seqlens_of(RAGGED), causal=causal).logits
    torch.testing.assert_close(flat, padded[mask.bool()])
    torch.testing.assert_close(flat_without_max, flat)


PACKED = [7, 1, 23, 12]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_packed_documents_equal_documents_alone(backend, causal):
    model = loud_model(attn_implementation=backend)
    ids, cu_seqlens = flat_documents(PACKED)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu_seqlens, causal=causal).logits
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            alone = model(ids[None, start:end], causal=causal).logits[0]
            assert_logits_close(packed[start:end], alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_packed_documents_never_see_each_other(backend, causal):
    model = loud_model(attn_implementation=backend)
    ids, cu_seqlens = flat_documents(PACKED)
    start, end = int(cu_seqlens[2]), int(cu_seqlens[3])  # the long document
    changed = ids.clone()
    changed[start:end] = (ids[start:end] + 1 - 4) % (VOCAB - 4) + 4
    with torch.no_grad():
        before = model(ids, cu_seqlens=cu_seqlens, causal=causal).logits
        after = model(changed, cu_seqlens=cu_seqlens, causal=causal).logits
    others = torch.ones(len(ids), dtype=torch.bool)
    others[start:end] = False
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=1e-6)
    assert max_difference(after[start:end], before[start:end]) > 0.1


# ------------------------------------------------------------------------------------------------
# sdpa's band attention (long sliding layers) against the eager grid


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_band_attention_equals_eager(causal):
    lengths = [1, 9, 31, 4, 17, 2]  # document boundaries fall inside the band's blocks
    ids, cu_seqlens = flat_documents(lengths)
    config = tiny_config()
    assert Layout(cu_seqlens, max(lengths), causal, config.window).use_band()
    sdpa = loud_model(attn_implementation="sdpa")
    eager = loud_model(attn_implementation="eager")
    with torch.no_grad():
        expected = eager(ids, cu_seqlens=cu_seqlens, causal=causal).logits
        assert_logits_close(sdpa(ids, cu_seqlens=cu_seqlens, causal=causal).logits, expected)
        # The same documents padded: one row each.
        padded_ids = torch.full((len(lengths), max(lengths)), PAD)
        mask = torch.zeros_like(padded_ids)
        for row, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            padded_ids[row, : end - start], mask[row, : end - start] = ids[start:end], 1
        assert_logits_close(sdpa(padded_ids, mask, causal=causal).logits[mask.bool()], expected)


# ------------------------------------------------------------------------------------------------
# Causal mode


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_output_ignores_later_tokens(backend):
    model = loud_model(attn_implementation=backend)
    ids, mask = padded_batch(RAGGED)
    cut = 8
    changed = ids.clone()
    changed[:, cut:] = (ids[:, cut:] + 1 - 4) % (VOCAB - 4) + 4
    changed = changed.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        before = model(ids, mask, causal=True).logits
        after = model(changed, mask, causal=True).logits
        bidirectional = model(changed, mask).logits
    torch.testing.assert_close(after[:, :cut], before[:, :cut], rtol=0, atol=1e-6)
    assert max_difference(after[0, cut:], before[0, cut:]) > 0.1
    # Run bidirectionally, the earlier positions do see the change: the same weights, both directions.
    assert max_difference(bidirectional[0, :cut], before[0, :cut]) > 0.1


def test_config_causal_is_the_default_direction():
    ids, mask = padded_batch(RAGGED)
    encoder = loud_model()
    decoder = loud_model(causal=True)
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids, mask).logits, encoder(ids, mask, causal=True).logits)
        torch.testing.assert_close(decoder(ids, mask, causal=False).logits, encoder(ids, mask).logits)


# ------------------------------------------------------------------------------------------------
# Labels, loss and gradients


def mlm_labels(ids: torch.Tensor, mask: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """About a third of the real tokens are targets; the rest and all padding are IGNORE_INDEX."""
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.35
    return ids.masked_fill(~(chosen & mask.bool()), IGNORE_INDEX)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_labels_give_cross_entropy_of_labelled_positions(causal):
    model = loud_model()
    ids, mask = padded_batch(RAGGED)
    labels = mlm_labels(ids, mask)
    targets = labels != IGNORE_INDEX
    assert 0 < targets.sum() < mask.sum()
    with torch.no_grad():
        full = model(ids, mask, causal=causal).logits
        mean = model(ids, mask, labels, causal=causal)
        total = model(ids, mask, labels, causal=causal, loss_reduction="sum")
    assert_logits_close(mean.logits, full[targets])  # only labelled positions, in stream order
    torch.testing.assert_close(total.logits, mean.logits)
    torch.testing.assert_close(mean.loss, F.cross_entropy(full[targets], labels[targets]))
    torch.testing.assert_close(total.loss, F.cross_entropy(full[targets], labels[targets], reduction="sum"))
    # Flat input with labels: the same positions.
    flat = model(ids[mask.bool()], labels=labels[mask.bool()], cu_seqlens=cu_seqlens_of(RAGGED),
                 causal=causal, loss_reduction="sum")
    torch.testing.assert_close(flat.loss, total.loss)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(ids, mask, labels, loss_reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_without_targets_has_zero_loss(reduction):
    model = loud_model()
    ids, mask = padded_batch(RAGGED)
    output = model(ids, mask, torch.full_like(ids, IGNORE_INDEX), loss_reduction=reduction)
    assert output.logits.shape == (0, VOCAB)
    assert output.loss.item() == 0.0
    output.loss.backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def loss_and_gradients(model: ModernBert, ids, mask, labels, causal: bool):
    model.zero_grad()
    loss = model(ids, mask, labels, causal=causal).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_agree_between_sdpa_and_eager(causal):
    """Both sdpa paths (band: RAGGED, grid: SHORT) and eager give the same loss, and gradients within
    1e-5 of each tensor's largest entry (observed <= 7e-6; with LOUD_STD weights 2.4e-5)."""
    for lengths in (RAGGED, SHORT):
        ids, mask = padded_batch(lengths)
        labels = mlm_labels(ids, mask)
        sdpa = loud_model(MODERATE_STD, attn_implementation="sdpa")
        eager = loud_model(MODERATE_STD, attn_implementation="eager")
        sdpa_loss, sdpa_grads = loss_and_gradients(sdpa, ids, mask, labels, causal)
        eager_loss, eager_grads = loss_and_gradients(eager, ids, mask, labels, causal)
        torch.testing.assert_close(sdpa_loss, eager_loss, rtol=1e-5, atol=0)
        for name, expected in eager_grads.items():
            assert expected.abs().max() > 0, name  # every parameter gets a gradient
            assert_logits_close(sdpa_grads[name], expected)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_no_nan_with_single_token_rows_and_heavy_padding(backend, causal):
    model = loud_model(attn_implementation=backend)
    # [14, 2]: sdpa's grid; causal, the padded queries 7+ of row 2 see no real key in their window.
    # [5, 0, 3]: a row of padding only.
    for lengths in (HEAVILY_PADDED, [1], [1, 1, 1], [14, 2], [5, 0, 3]):
        ids, mask = padded_batch(lengths)
        logits = model(ids, mask, causal=causal).logits
        assert torch.isfinite(logits).all()
        loss = model(ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX), causal=causal).loss
        model.zero_grad()
        (loss + logits.sum()).backward()
        assert torch.isfinite(loss)
        for name, param in model.named_parameters():
            assert torch.isfinite(param.grad).all(), name


# ------------------------------------------------------------------------------------------------
# Mixed precision


def test_rope_cos_sin_are_fp32():
    cos, sin = rope_cos_sin(torch.arange(300), 16, 10000.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (300, 1, 1, 8)


def test_bf16_model_keeps_rope_in_fp32(monkeypatch):
    """A bf16 model matches its fp32 self within 0.1 relative (norm of the logit difference over the
    norm of the logits): measured 0.04 from bf16 rounding through 4 layers, but 0.46 with RoPE angles
    computed in bf16, which cannot hold integer positions past 256 (the rows here are 300 and 280
    long). And the cos/sin that RoPE gets are fp32 while q and k stay bf16."""
    fp32 = make_loud(ModernBert(tiny_config()), seed=4, weight_std=MODERATE_STD).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids, mask = padded_batch([300, 280])
    with torch.no_grad():
        expected = fp32(ids, mask).logits
    rope_dtypes = []
    original = ettin.model.modernbert.apply_rope

    def spy(x, cos, sin):
        rope_dtypes.append((x.dtype, cos.dtype, sin.dtype))
        return original(x, cos, sin)

    monkeypatch.setattr(ettin.model.modernbert, "apply_rope", spy)
    with torch.no_grad():
        logits = bf16(ids, mask).logits
    assert logits.dtype == torch.bfloat16
    relative = (logits.float() - expected).norm() / expected.norm()
    assert relative < 0.1
    assert rope_dtypes and set(rope_dtypes) == {(torch.bfloat16, torch.float32, torch.float32)}


# ------------------------------------------------------------------------------------------------
# Initialization


def truncated_normal_std(std: float, cutoff: float) -> float:
    """Standard deviation of N(0, std^2) cut at +-cutoff * std."""
    density = math.exp(-cutoff**2 / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cutoff / math.sqrt(2))
    return std * math.sqrt(1 - 2 * cutoff * density / mass)


def test_init_is_the_documented_truncated_normal():
    """17m with every optional bias on: sigma for the embeddings, Wqkv, mlp.Wi and head.dense;
    sigma / sqrt(2 L) for attn.Wo and mlp.Wo; cut at +-cutoff * sigma; biases 0, norms 1."""
    config = model_config("17m", vocab_size=4096,  # a smaller embedding, still 1M samples
                          attention_bias=True, mlp_bias=True, norm_bias=True, head_bias=True)
    model = ModernBert(config)
    sigma, cutoff = config.initializer_range, config.initializer_cutoff_factor
    out_sigma = sigma / math.sqrt(2 * config.num_hidden_layers)
    for name, param in model.named_parameters():
        param = param.detach()
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith(".bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            if name.endswith(("attn.Wo.weight", "mlp.Wo.weight")):
                std = out_sigma
            elif name.endswith(("tok_embeddings.weight", "attn.Wqkv.weight", "mlp.Wi.weight",
                                "head.dense.weight")):
                std = sigma
            else:
                raise AssertionError(f"{name}: no documented init")
            assert param.abs().max() <= cutoff * std, name
            assert param.abs().max() > 0.98 * cutoff * std, name  # cut at the cutoff, not before
            assert abs(param.std().item() / truncated_normal_std(std, cutoff) - 1) < 0.05, name
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
