"""The training step alone (ettin.train.step.TrainStep): loss normalisation against an independent
full-batch reference, the LR it sets, and the stop on a non-finite loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ettin.model.config import model_config
from ettin.model.modernbert import ModernBert
from ettin.data.loader import LoaderState
from ettin.train.step import NonFiniteLossError, StepSettings, TrainStep


def tiny_model() -> ModernBert:
    torch.manual_seed(0)
    return ModernBert(model_config("tiny", vocab_size=128, window=4, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2, mask_token_id=3))


def micro_batch(lengths: list[int], label_every: int, seed: int) -> dict:
    """Unpadded rows of random tokens; every ``label_every``-th position is a target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (sum(lengths),), generator=g)
    labels = torch.full_like(ids, -100)
    labels[::label_every] = torch.randint(4, 128, labels[::label_every].shape, generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # As the collator gives them: the longest row and the labelled positions, known on the host.
    return {"input_ids": ids, "labels": labels, "cu_seqlens": cu, "max_seqlen": max(lengths),
            "target_index": (labels != -100).nonzero().squeeze(1)}


# Unequal micro-batches: 3 rows with 1 target in 2 positions vs 1 row with a target everywhere.
BATCHES = [micro_batch([9, 7, 5], label_every=2, seed=1), micro_batch([6], label_every=1, seed=2)]


def counts(batches):
    return [int((b["labels"] != -100).sum()) for b in batches], [len(b["cu_seqlens"]) - 1 for b in batches]


def sgd_step(batches, normalization: str, lr: float = 0.5) -> dict[str, torch.Tensor]:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    targets, rows = counts(batches)
    step = TrainStep(model, optimizer, StepSettings(lr=lr, lr_multiplier=lambda tokens: 1.0, peak_lr=lr, loss_normalization=normalization))
    step(batches, tokens_before=0, targets=targets, rows=rows)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference_step(loss_of, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """One SGD step on ``loss_of(model)``, computed from scratch with torch's cross_entropy."""
    model = tiny_model()
    loss_of(model).backward()
    with torch.no_grad():
        return {n: (p - lr * p.grad).clone() for n, p in model.named_parameters()}


def cross_entropies(model, batch) -> torch.Tensor:
    keep = batch["labels"] != -100
    out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"])
    return F.cross_entropy(out.logits[keep], batch["labels"][keep], reduction="none")


@pytest.mark.slow
def test_token_normalisation_equals_one_full_batch_mean_loss():
    def mean_over_all_targets(model):
        return torch.cat([cross_entropies(model, b) for b in BATCHES]).mean()

    ours, expected = sgd_step(BATCHES, "tokens"), reference_step(mean_over_all_targets)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-6)
    # Not trivially so: the per-micro-batch mean gives another update on these batches.
    other = sgd_step(BATCHES, "micro_batch")
    assert max((other[n] - expected[n]).abs().max() for n in expected) > 1e-4


def test_micro_batch_normalisation_is_composers_weighted_per_micro_batch_mean():
    _, rows = counts(BATCHES)

    def composer(model):
        return sum(cross_entropies(model, b).mean() * r / sum(rows) for b, r in zip(BATCHES, rows))

    ours, expected = sgd_step(BATCHES, "micro_batch"), reference_step(composer)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-6)


def test_the_step_sets_the_lr_of_the_tokens_seen_before_it():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=123.0)
    step = TrainStep(model, optimizer, StepSettings(lr=2e-3, lr_multiplier=lambda tokens: tokens / 1000, peak_lr=2e-3))
    targets, rows = counts(BATCHES)
    result = step(BATCHES, tokens_before=250, targets=targets, rows=rows)
    assert result.lr == pytest.approx(5e-4)
    assert all(group["lr"] == pytest.approx(5e-4) for group in optimizer.param_groups)
    assert float(result.global_targets) == sum(targets)


def test_a_non_finite_loss_stops_at_the_next_check():
    model = tiny_model()
    with torch.no_grad():
        model.model.final_norm.weight.fill_(float("nan"))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), StepSettings(lr=0.1, lr_multiplier=lambda tokens: 1.0, peak_lr=0.1))
    targets, rows = counts(BATCHES)
    step(BATCHES, tokens_before=0, targets=targets, rows=rows)
    with pytest.raises(NonFiniteLossError, match="NaN/inf, found before step 1"):
        step.check_finite("step 1")


def test_a_finite_step_passes_the_check_and_reports_a_gradient_norm():
    model = tiny_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), StepSettings(lr=0.1, lr_multiplier=lambda tokens: 1.0, peak_lr=0.1))
    targets, rows = counts(BATCHES)
    result = step(BATCHES, tokens_before=0, targets=targets, rows=rows)
    step.check_finite("step 1")
    assert float(result.grad_norm) > 0


def test_a_restored_optimizer_takes_this_phases_hyperparameters_and_the_recipes_peak_as_max_lr():
    """Moments carry over from the previous phase; weight decay, betas, eps do not, and max_lr (the
    weight-decay scale of StableAdamW) is the recipe's peak even when the phase starts at half of it."""
    from ettin.train.module import EttinModule
    from ettin.objectives import ObjectiveMix

    def module(optimizer_state=None, **optim):
        settings = StepSettings(lr=optim.get("lr", 1e-3), peak_lr=2e-3, lr_multiplier=lambda t: 1.0,
                                weight_decay=optim.get("weight_decay", 1e-5),
                                betas=optim.get("betas", (0.9, 0.98)), eps=optim.get("eps", 1e-6))
        return EttinModule(tiny_model(), objective=ObjectiveMix.of({"mlm": 1.0}), settings=settings,
                           phase_tokens=100, loader_state=LoaderState(), optimizer_state=optimizer_state)

    previous = module(weight_decay=0.5, betas=(0.5, 0.5), eps=1e-3).configure_optimizers()
    previous.state[previous.param_groups[1]["params"][0]]["exp_avg"] = torch.ones(1)  # a moment
    restored = module(optimizer_state=previous.state_dict(), weight_decay=1e-5).configure_optimizers()
    no_decay, decay = restored.param_groups
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 1e-5)
    assert decay["betas"] == (0.9, 0.98) and decay["eps"] == 1e-6
    assert no_decay["max_lr"] == decay["max_lr"] == 2e-3
    assert torch.equal(restored.state[decay["params"][0]]["exp_avg"], torch.ones(1))


@pytest.mark.slow
@pytest.mark.parametrize("normalization", ["tokens", "micro_batch"])
def test_a_step_never_waits_on_the_device(monkeypatch, normalization):
    """No host sync inside a step (without the grad norm of log steps), with the real optimizer:
    every way a tensor's value reaches Python is counted while it runs, and every aten op that
    needs a device value or makes a tensor from host data (``ettin.bench.gpu.HostSyncs``)."""
    from ettin.bench.gpu import HostSyncs
    from ettin.optim.stable_adamw import StableAdamW

    model = tiny_model()
    step = TrainStep(model, StableAdamW(model.parameters(), lr=0.1, weight_decay=0.1), StepSettings(lr=0.1, lr_multiplier=lambda tokens: 1.0, peak_lr=0.1, loss_normalization=normalization))
    targets, rows = counts(BATCHES)
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: syncs.append(_n) or _o(self, *a, **k))
    with HostSyncs() as ops:
        for _ in range(2):  # the first step and a later one
            step(BATCHES, tokens_before=0, targets=targets, rows=rows)
    monkeypatch.undo()
    assert syncs == [] and ops.found == []


def test_ranks_are_summed_without_a_barrier(monkeypatch):
    """The step's sums over ranks are bare all-reduces: Lightning's strategy.reduce puts a barrier
    first, and an NCCL barrier blocks the host until the GPU has caught up, at every step."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from ettin.train.module import EttinModule
    from ettin.objectives import ObjectiveMix

    module = EttinModule(tiny_model(), objective=ObjectiveMix.of({"mlm": 1.0}),
                         settings=StepSettings(lr=1e-3, lr_multiplier=lambda t: 1.0, peak_lr=1e-3),
                         phase_tokens=100, loader_state=LoaderState())
    module._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda *a, **k: pytest.fail("strategy.reduce: a barrier at every step")))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: pytest.fail("a barrier at every step"))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: tensor.mul_(2))  # two equal ranks
    value = torch.tensor([3.0, 4.0])
    assert torch.equal(module._sum_over_ranks(value), torch.tensor([6.0, 8.0]))
    assert torch.equal(value, torch.tensor([3.0, 4.0]))  # the caller's tensor is left as it was
