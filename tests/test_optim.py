"""StableAdamW against a direct re-statement of recipe.md section 3, and the parameter groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ettin.optim.stable_adamw import (StableAdamW, debias_beta, grad_norm, param_group_names,
                                      param_groups)

BETAS = (0.9, 0.98)
EPS = 1e-6


class Reference:
    """recipe.md section 3, written out one tensor at a time with plain tensor ops."""

    def __init__(self, params, lr, weight_decays, betas=BETAS, eps=EPS, max_lr=None):
        self.params = [p.detach().clone() for p in params]
        self.wd = list(weight_decays)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.max_lr = lr if max_lr is None else max_lr
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.rms_seen: list[float] = []

    def step(self, grads):
        self.t += 1
        t, (beta1, beta2), eps = self.t, self.betas, self.eps
        b1 = (beta1**t - beta1) / (beta1**t - 1)  # = beta (1 - beta^(t-1)) / (1 - beta^t)
        b2 = (beta2**t - beta2) / (beta2**t - 1)
        for i, g in enumerate(grads):
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            rms = torch.sqrt(torch.mean(g * g / torch.clamp(self.v[i], min=eps * eps)))
            self.rms_seen.append(float(rms))
            eta = self.lr / max(1.0, float(rms))
            if self.wd[i] != 0:
                self.params[i] = self.params[i] * (1 - (eta / self.max_lr) * self.wd[i])
            self.params[i] = self.params[i] - eta * self.m[i] / (torch.sqrt(self.v[i]) + eps)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (), (64, 33), (4, 3)]
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, step, scale=1.0, seed=1):
    """Different scales per tensor; the last one is tiny, so v < eps^2 and the eps^2 floor matters."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    scales = [1.0, 2.0, 3.0, 4.0, 5.0, 3e-7][: len(params)]
    return [scale * s * torch.randn(p.shape, generator=gen) for s, p in zip(scales, params)]


def _close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.detach(), e, rtol=2e-6, atol=2e-7)


def _run(weight_decay, *, steps=12, lrs=None, max_lr=None, spike_at=None):
    params = _params()
    lr = 1e-2
    groups = [{"params": params[:2], "weight_decay": 0.0},
              {"params": params[2:], "weight_decay": weight_decay}]
    opt = StableAdamW(groups, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay, max_lr=max_lr)
    ref = Reference(params, lr, [0.0, 0.0] + [weight_decay] * 4, max_lr=max_lr)
    for step in range(steps):
        scale = 100.0 if step == spike_at else 1.0
        grads = _grads(params, step, scale)
        if lrs is not None:  # a schedule: lr moves, max_lr stays
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            ref.lr = lrs[step]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
        _close(params, ref.params)
    return opt, ref


def test_debias_beta_matches_the_recipe_form():
    for beta in BETAS:
        for t in (1, 2, 3, 10, 1000):
            assert debias_beta(beta, t) == pytest.approx((beta**t - beta) / (beta**t - 1), rel=1e-12)
    assert debias_beta(0.9, 1) == 0.0  # first step: m = g, v = g^2


def test_matches_reference_without_weight_decay():
    _run(0.0)


def test_matches_reference_with_weight_decay_and_a_schedule():
    lrs = [1e-2 * min(1.0, (s + 1) / 4) * (1.0 if s < 8 else 0.5) for s in range(12)]
    opt, _ = _run(0.1, lrs=lrs, max_lr=1e-2)
    assert all(g["max_lr"] == 1e-2 for g in opt.param_groups)


def test_weight_decay_scales_with_lr_over_max_lr_not_lr():
    # One scalar parameter with zero gradient: only the decay moves it, by wd * lr / max_lr.
    p = nn.Parameter(torch.tensor([2.0]))
    opt = StableAdamW([p], lr=1e-3, weight_decay=0.1, max_lr=4e-3)
    p.grad = torch.zeros(1)
    opt.step()
    assert p.item() == pytest.approx(2.0 * (1 - 0.1 * 1e-3 / 4e-3), rel=1e-6)


def test_matches_reference_when_update_clipping_is_active():
    _, ref = _run(0.05, steps=10, spike_at=5)
    assert max(ref.rms_seen) > 1.5, "the gradient spike should make rms > 1 (clipping active)"


def test_toy_regression_problem_matches_reference_and_learns():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 3) + 0.1
    model = nn.Linear(8, 3)
    ref_model = copy.deepcopy(model)
    opt = StableAdamW(param_groups(model, 0.01), lr=3e-2, weight_decay=0.01)
    names = [n for n, _ in model.named_parameters()]  # weight, bias -> groups [bias], [weight]
    ref = Reference([model.bias, model.weight], 3e-2, [0.0, 0.01])
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_model.bias.data, ref_model.weight.data = ref.params[0], ref.params[1]
        ref_model.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref.step([ref_model.bias.grad, ref_model.weight.grad])
        _close([model.bias, model.weight], ref.params)
    assert names == ["weight", "bias"]
    assert losses[-1] < 0.2 * losses[0]


def test_chunked_foreach_path_matches_reference(monkeypatch):
    import ettin.optim.stable_adamw

    monkeypatch.setattr(ettin.optim.stable_adamw, "CHUNK_ELEMENTS", 40)  # several chunks per group
    _run(0.1, steps=6, spike_at=3)


def test_max_lr_defaults_to_the_construction_lr_and_is_saved():
    params = _params()
    opt = StableAdamW(params, lr=5e-4)
    assert opt.param_groups[0]["max_lr"] == 5e-4
    state = opt.state_dict()
    assert state["param_groups"][0]["max_lr"] == 5e-4
    # A new optimizer built with another LR takes the saved max_lr and step counter back.
    other = StableAdamW(params, lr=2.5e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["max_lr"] == 5e-4 and other.param_groups[0]["step"] == 1


def test_state_dict_round_trip_continues_identically():
    def fresh():
        params = _params()
        return params, StableAdamW([{"params": params[:2], "weight_decay": 0.0},
                                    {"params": params[2:], "weight_decay": 0.1}], lr=1e-2, weight_decay=0.1)

    params_a, opt_a = fresh()
    for step in range(8):
        for p, g in zip(params_a, _grads(params_a, step)):
            p.grad = g
        opt_a.step()

    params_b, opt_b = fresh()
    for step in range(4):
        for p, g in zip(params_b, _grads(params_b, step)):
            p.grad = g
        opt_b.step()
    saved_params = [p.detach().clone() for p in params_b]
    saved_state = copy.deepcopy(opt_b.state_dict())
    params_c, opt_c = fresh()
    with torch.no_grad():
        for p, s in zip(params_c, saved_params):
            p.copy_(s)
    opt_c.load_state_dict(saved_state)
    for step in range(4, 8):
        for p, g in zip(params_c, _grads(params_c, step)):
            p.grad = g
        opt_c.step()
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)


def test_parameters_without_gradients_are_skipped():
    params = _params()
    opt = StableAdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:]))
    assert len(opt.state) == 1


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        StableAdamW(_params(), lr=0.0)
    with pytest.raises(ValueError):
        StableAdamW(_params(), lr=1e-3, betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        StableAdamW(_params(), lr=1e-3, weight_decay=-1.0)


def test_grad_norm_is_the_global_l2_norm():
    params = _params()
    for step, p in enumerate(params):
        p.grad = _grads(params, 0)[step]
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
    assert float(grad_norm(params)) == pytest.approx(expected, rel=1e-6)
    params[0].grad = None
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params[1:]))
    assert float(grad_norm(params)) == pytest.approx(expected, rel=1e-6)


class TinyTied(nn.Module):
    """Embedding + LayerNorm + Linear with bias + a vocabulary projection tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.dense = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6, bias=False)
        self.frozen.weight.requires_grad_(False)
        self.decoder = nn.Linear(6, 11)
        self.decoder.weight = self.emb.weight


def test_param_groups_on_a_small_module_with_a_tied_embedding():
    model = TinyTied()
    no_decay, decay = param_groups(model, 0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["decoder.bias", "dense.bias", "norm.bias",
                                                                 "norm.weight"]
    assert sorted(names[id(p)] for p in decay["params"]) == ["dense.weight", "emb.weight"]
    # The tied weight is counted once; the frozen weight not at all.
    assert sum(p is model.emb.weight for g in (no_decay, decay) for p in g["params"]) == 1
    total = sum(p.numel() for g in (no_decay, decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters() if p.requires_grad)
    StableAdamW(param_groups(model, 0.1), lr=1e-3)  # torch refuses duplicates across groups


def test_param_groups_on_modernbert():
    from ettin.model.modernbert import ModernBert
    from ettin.model.config import model_config

    model = ModernBert(model_config("tiny", vocab_size=128))
    no_decay, decay = param_group_names(model)
    layers = model.config.num_hidden_layers
    expected_no_decay = (
        ["model.embeddings.norm.weight", "model.final_norm.weight", "head.norm.weight", "decoder.bias"]
        + [f"model.layers.{i}.mlp_norm.weight" for i in range(layers)]
        + [f"model.layers.{i}.attn_norm.weight" for i in range(1, layers)]
    )
    expected_decay = (
        ["model.embeddings.tok_embeddings.weight", "head.dense.weight"]
        + [f"model.layers.{i}.{k}.weight" for i in range(layers)
           for k in ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")]
    )
    assert sorted(no_decay) == sorted(expected_no_decay)
    assert sorted(decay) == sorted(expected_decay)
    groups = param_groups(model, 1e-5)
    assert [len(g["params"]) for g in groups] == [len(no_decay), len(decay)]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_does_not_synchronise_with_the_gpu():
    params = [nn.Parameter(p.detach().cuda()) for p in _params()]
    opt = StableAdamW([{"params": params[:2], "weight_decay": 0.0},
                       {"params": params[2:], "weight_decay": 0.1}], lr=1e-2, weight_decay=0.1)
    ref = Reference([p.cpu() for p in params], 1e-2, [0.0, 0.0, 0.1, 0.1, 0.1, 0.1])
    for step in range(3):
        grads = _grads(params, step, 100.0 if step == 2 else 1.0)
        for p, g in zip(params, grads):
            p.grad = g.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.step(grads)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.detach().cpu(), r, rtol=1e-5, atol=1e-6)
