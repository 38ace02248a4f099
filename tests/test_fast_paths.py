"""The model's fast paths against its plain path: the chunked loss, collator-provided indices (no
host-device sync), n_correct, masks built once per layer kind.

"No sync" is checked on CPU with ``ettin.bench.gpu.HostSyncs``, a TorchDispatchMode that sees every
aten op of a forward, backward and optimizer step: none may be one that reads a device value back to
the host (``_local_scalar_dense`` is what ``.item()``, ``int()``, ``bool()`` and ``float()`` of a
tensor run; ``nonzero``, ``masked_select``, boolean indexing, ``repeat_interleave`` without
output_size and ``unique`` need the result's size from the device). On CUDA the GPU bench counts
the same with ``torch.cuda.set_sync_debug_mode``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ettin.model.modernbert
from ettin.bench.gpu import HostSyncs
from ettin.model.config import ModelConfig
from ettin.objectives.collate import CLMCollator, MLMCollator
from ettin.data.tokenizer import SpecialIds
from ettin.model.modernbert import IGNORE_INDEX, ModernBert, linear_cross_entropy
from ettin.optim.stable_adamw import StableAdamW
from ettin.parallel.speedups import apply_speedups

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

VOCAB = 97
IDS = SpecialIds(cls=0, sep=1, pad=2, mask=3, unk=4, all=frozenset(range(5)))
# Rows longer than 2 * window + 1 (sliding layers mask something) and a row of one token.
ROW_LENGTHS = (23, 9, 1, 17)


def tiny_model(seed: int = 0, **overrides) -> ModernBert:
    """Global and sliding layers, biases on the vocabulary projection; weights loud enough that the
    softmax is far from uniform (loss and argmax depend on every detail)."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=2, window=3, global_rope_theta=500.0,
                                   local_rope_theta=20.0, pad_token_id=IDS.pad, bos_token_id=IDS.cls,
                                   eos_token_id=IDS.sep, mask_token_id=IDS.mask), **overrides})
    model = ModernBert(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3) if param.ndim > 1 else param.uniform_(-0.5, 1.0)
    return model


def rows(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [(i, np.concatenate(([IDS.cls], rng.integers(5, VOCAB, n - 1)))) for i, n in enumerate(ROW_LENGTHS)]


def batch(objective: str) -> dict:
    """What the default (unpadded) collator of the objective gives the model."""
    if objective == "clm":
        return CLMCollator(IDS, vocab_size=VOCAB)(rows())
    return MLMCollator(IDS, vocab_size=VOCAB, mask_rate=0.4, seed=1)(rows())


def loss_and_grads(model: ModernBert, inputs: dict, causal: bool, **options):
    model.zero_grad(set_to_none=True)
    out = model(**inputs, causal=causal, **options)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


OBJECTIVES = [("mlm", False), ("clm", True)]


@pytest.mark.slow
@pytest.mark.parametrize("objective, causal", OBJECTIVES)
@pytest.mark.parametrize("chunk", [7, 10_000])  # several chunks and a remainder; one chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_loss_equals_plain_loss_and_gradients(objective, causal, chunk, reduction):
    inputs = batch(objective)
    model = tiny_model()
    plain, plain_grads = loss_and_grads(model, inputs, causal, loss_reduction=reduction)
    model.loss_implementation, model.loss_chunk_tokens = "chunked", chunk
    chunked, chunked_grads = loss_and_grads(model, inputs, causal, loss_reduction=reduction)
    assert chunked.logits is None and plain.logits.shape == (len(inputs["target_index"]), VOCAB)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=0)
    assert chunked.n_correct.dtype == torch.long and chunked.n_correct.dim() == 0
    assert int(chunked.n_correct) == int(plain.n_correct)
    assert torch.equal(chunked.targets, plain.targets)
    for name, expected in plain_grads.items():
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_chunked_loss_under_bf16_autocast_matches_plain():
    """Under autocast both compute the vocabulary projection in bf16 and the loss in fp32."""
    inputs = batch("clm")
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, inputs, True)
    model.loss_implementation = "chunked"
    model.loss_chunk_tokens = 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, chunked_grads = loss_and_grads(model, inputs, True)
    assert plain.logits.dtype == torch.bfloat16 and chunked.loss.dtype == torch.float32
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=2e-3, atol=0)
    for name, expected in plain_grads.items():
        assert chunked_grads[name].dtype == torch.float32
        scale = float(expected.abs().max())
        assert float((chunked_grads[name] - expected).abs().max()) <= 0.02 * scale, name


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_chunked_loss_never_holds_the_targets_by_vocab_logits():
    """With a 4096-token vocabulary the [targets, vocab] logits (46 x 4096) are the largest tensor of
    the plain step; the chunked step's largest is the [vocab, hidden] weight gradient (4096 x 32)."""
    inputs = batch("clm")
    model = tiny_model(vocab_size=4096)
    n_logits = len(inputs["target_index"]) * 4096
    assert n_logits > 4096 * 32
    for implementation, holds_logits in (("plain", True), ("chunked", False)):
        model.loss_implementation, model.loss_chunk_tokens = implementation, 8
        with LargestTensor() as largest:
            model(**inputs, causal=True).loss.backward()
        assert (largest.numel >= n_logits) == holds_logits, (implementation, largest.numel)
        assert largest.numel >= 4096 * 32


def test_linear_cross_entropy_against_torch():
    """The function alone against F.cross_entropy on the full logits, without a bias."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    loss, n_correct = linear_cross_entropy(hidden, weight, None, targets, chunk=5)
    loss.mul(3.0).backward()  # a non-unit upstream gradient
    logits = hidden.detach() @ weight.detach().t()
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    F.cross_entropy(h @ w.t(), targets, reduction="sum").mul(3.0).backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, reduction="sum"))
    assert int(n_correct) == int((logits.argmax(-1) == targets).sum()) > 0
    torch.testing.assert_close(hidden.grad, h.grad)
    torch.testing.assert_close(weight.grad, w.grad)
    with torch.no_grad():  # evaluation: no gradients computed or kept
        assert linear_cross_entropy(hidden, weight, None, targets, chunk=5)[0].requires_grad is False
    with pytest.raises(ValueError, match="loss_chunk_tokens must be >= 1"):
        linear_cross_entropy(hidden, weight, None, targets, chunk=0)


@pytest.mark.slow
@pytest.mark.parametrize("loss_implementation", ["plain", "chunked"])
@pytest.mark.parametrize("objective, causal", OBJECTIVES)
def test_n_correct_counts_targets_whose_argmax_is_the_label(objective, causal, loss_implementation):
    """Labels set to the model's own top prediction at the first 5 targets and to another token at
    the others: n_correct must be exactly 5."""
    inputs = batch(objective)
    model = tiny_model()
    model.loss_implementation, model.loss_chunk_tokens = loss_implementation, 4
    index = inputs["target_index"]
    with torch.no_grad():
        predicted = model(inputs["input_ids"], cu_seqlens=inputs["cu_seqlens"],
                          causal=causal).logits.argmax(-1)[index]
        labels = inputs["labels"].clone()
        labels[index] = torch.where(torch.arange(len(index)) < 5, predicted, (predicted + 1) % VOCAB)
        out = model(**{**inputs, "labels": labels}, causal=causal)
    assert len(index) > 5 and out.n_correct.dim() == 0
    assert int(out.n_correct) == 5
    assert torch.equal(out.targets, labels[index])


@pytest.mark.parametrize("objective, causal", OBJECTIVES)
def test_collator_indices_give_the_same_loss_and_gradients(objective, causal):
    inputs = batch(objective)
    model = tiny_model()
    given, given_grads = loss_and_grads(model, inputs, causal)
    derived_inputs = {k: v for k, v in inputs.items() if k not in ("target_index", "max_seqlen")}
    derived, derived_grads = loss_and_grads(model, derived_inputs, causal)
    torch.testing.assert_close(given.loss, derived.loss, rtol=0, atol=0)
    for name, expected in derived_grads.items():
        torch.testing.assert_close(given_grads[name], expected, rtol=0, atol=0)


def training_step(model: ModernBert, optimizer, inputs: dict, causal: bool) -> None:
    out = model(**inputs, causal=causal, loss_reduction="sum")
    out.loss.backward()
    torch.stack([out.loss.detach(), out.n_correct.float()]) / max(out.targets.numel(), 1)  # logged
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.slow
@pytest.mark.parametrize("loss_implementation", ["plain", "chunked"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("objective, causal", OBJECTIVES)
def test_a_training_step_on_collated_input_never_syncs(objective, causal, attn, loss_implementation):
    model = tiny_model(attn_implementation=attn)
    model.loss_implementation, model.loss_chunk_tokens = loss_implementation, 16
    optimizer = StableAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    inputs = batch(objective)
    # Long rows: sdpa's sliding layers take the band path as well as the grid.
    long = CLMCollator(IDS, vocab_size=VOCAB)([(0, np.arange(5, 85)), (1, np.arange(5, 45))])
    assert model.model.layers[1].attn.sliding
    for step_inputs in (inputs, long):
        with HostSyncs() as syncs:
            training_step(model, optimizer, step_inputs, causal)
        assert syncs.found == []
    # The detector sees the syncs of the plain call: padded input, no collator indices.
    padded = (CLMCollator if objective == "clm" else MLMCollator)(
        IDS, unpadded=False, **({"vocab_size": VOCAB} if objective == "clm" else
                                dict(vocab_size=VOCAB, mask_rate=0.4, seed=1)))(rows())
    with HostSyncs() as syncs:
        training_step(model, optimizer, padded, causal)
    assert "nonzero" in syncs.found and "_local_scalar_dense" in syncs.found


def test_host_syncs_sees_tensors_made_from_host_data():
    """On a GPU torch.tensor(x, device=...) copies from pageable memory and waits for the queue."""
    with HostSyncs() as syncs:
        torch.full((), 3.0)
    assert syncs.found == []
    with HostSyncs() as syncs:
        torch.tensor(3.0)
    assert syncs.found == ["lift_fresh"]


def test_sdpa_band_path_is_taken_by_the_long_batch():
    model = tiny_model()
    long = CLMCollator(IDS, vocab_size=VOCAB)([(0, np.arange(5, 85)), (1, np.arange(5, 45))])
    layout = ettin.model.modernbert.Layout(long["cu_seqlens"], long["max_seqlen"], True, model.config.window,
                                n_tokens=len(long["input_ids"]))
    assert layout.use_band() and not layout.uniform


@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 3, 5], [4], [3, 0, 2]])
def test_layout_uniform_from_shapes_equals_all_rows_full(lengths):
    cu_seqlens = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).int()
    layout = ettin.model.modernbert.Layout(cu_seqlens, max(lengths), False, 2, n_tokens=sum(lengths))
    assert layout.uniform == all(n == max(lengths) for n in lengths)


@pytest.mark.slow
def test_flex_block_masks_are_built_once_per_layer_kind(monkeypatch):
    """4 layers (global, sliding, sliding, global): two block masks per forward, whatever the
    number of layers; the output equals sdpa's."""
    from torch.nn.attention import flex_attention

    built = []
    create = flex_attention.create_block_mask

    def counting_create(*args, **kwargs):
        built.append(args[0])
        return create(*args, **kwargs)

    monkeypatch.setattr(flex_attention, "create_block_mask", counting_create)
    inputs = batch("clm")
    flex = tiny_model(attn_implementation="flex")
    sdpa = tiny_model(attn_implementation="sdpa")
    flat = dict(input_ids=inputs["input_ids"], cu_seqlens=inputs["cu_seqlens"], max_seqlen=inputs["max_seqlen"])
    for causal in (False, True):
        built.clear()
        with torch.no_grad():
            logits = flex(**flat, causal=causal).logits
            expected = sdpa(**flat, causal=causal).logits
        assert len(built) == 2
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_masks_exist_before_the_first_layer_runs(attn, monkeypatch):
    """Layers (compiled one by one on GPU) only read the masks: all are built before layer 0."""
    model = tiny_model(attn_implementation=attn)
    seen = []
    for layer in model.model.layers:
        monkeypatch.setattr(layer, "forward", lambda x, layout, rope, f=layer.forward: (
            seen.append(frozenset(layout._cache)), f(x, layout, rope))[1])
    long = CLMCollator(IDS, vocab_size=VOCAB)([(0, np.arange(5, 85)), (1, np.arange(5, 45))])
    with torch.no_grad():
        model(long["input_ids"], cu_seqlens=long["cu_seqlens"], max_seqlen=long["max_seqlen"], causal=True)
    assert len(seen) == 4 and len(set(seen)) == 1
    expected = {("flex", False), ("flex", True)} if attn == "flex" else {"band", "grid_index", ("grid", False)}
    assert seen[0] == expected


def test_bad_fast_path_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="loss_implementation='fused' is unknown; choose one of plain, chunked"):
        ModernBert(tiny_model().config, loss_implementation="fused")
    model = tiny_model()
    inputs = batch("mlm")
    with pytest.raises(ValueError, match="target_index indexes the labels of the flat stream"):
        model(inputs["input_ids"][None], labels=inputs["labels"][None], target_index=inputs["target_index"])


@pytest.mark.slow
def test_compiled_layers_trace_every_backend_without_graph_breaks():
    """Per-layer compilation (Dynamo's capture; its eager backend runs the captured graphs, so this
    takes seconds on CPU) gives the uncompiled logits for sdpa and flex, with no graph break: the
    layout's masks and BlockMasks reach the compiled layers as inputs."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    reference = tiny_model()
    long = CLMCollator(IDS, vocab_size=VOCAB)([(0, np.arange(5, 85)), (1, np.arange(5, 45))])
    for attn in ("sdpa", "flex"):
        model = tiny_model(attn_implementation=attn)
        apply_speedups(model, compile=True, activation_checkpointing=False, backend="eager")
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        assert getattr(torch._dynamo.config, limit) >= 64  # else layers past 8 variants run uncompiled
        for inputs in (batch("clm"), long):
            flat = dict(input_ids=inputs["input_ids"], cu_seqlens=inputs["cu_seqlens"],
                        max_seqlen=inputs["max_seqlen"], causal=True)
            with torch.no_grad():
                expected = reference(**flat).logits
                torch.testing.assert_close(model(**flat).logits, expected, rtol=1e-5,
                                           atol=1e-5 * float(expected.abs().max()))
    assert sum(counters["graph_break"].values()) == breaks
    torch._dynamo.reset()


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """...and really recomputes each layer in the backward pass (its MLP runs twice)."""
    inputs = batch("mlm")
    grads = []
    for checkpointed in (False, True):
        model = tiny_model()
        apply_speedups(model, compile=False, activation_checkpointing=checkpointed)
        calls = []
        model.model.layers[1].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        model(**inputs).loss.backward()
        assert len(calls) == (2 if checkpointed else 1)
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert set(model.state_dict()) == set(tiny_model().state_dict())  # no wrapper modules
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


@pytest.mark.slow
@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("objective, causal", OBJECTIVES)
def test_compiled_layers_give_the_same_loss_and_gradients(objective, causal, checkpointed):
    """The backward pass too, through AOTAutograd (``aot_eager``: the joint graph inductor would
    compile, run without code generation), for the short and the long (band) layouts, alone and
    with activation checkpointing (both switches on, as a large run sets them)."""
    import torch._dynamo

    torch._dynamo.reset()
    long = CLMCollator(IDS, vocab_size=VOCAB)([(0, np.arange(5, 85)), (1, np.arange(5, 45))])
    compiled = tiny_model()
    apply_speedups(compiled, compile=True, activation_checkpointing=checkpointed, backend="aot_eager")
    for inputs in (batch(objective), long):
        plain, plain_grads = loss_and_grads(tiny_model(), inputs, causal)
        out, grads = loss_and_grads(compiled, inputs, causal)
        torch.testing.assert_close(out.loss, plain.loss, rtol=1e-6, atol=0)
        for name, expected in plain_grads.items():
            torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    torch._dynamo.reset()
