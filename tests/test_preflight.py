"""The preflight (python -m ettin.train ... preflight=true) and the memory model it rests on
(ettin/model/memory.py), against peaks measured by the kernel."""

from __future__ import annotations

import pytest

from ettin.model.config import model_config
from ettin.model.memory import training_memory
from ettin.train_command import main


@pytest.mark.slow
def test_preflight_prints_every_phase_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipe=smoke", "preflight=true", "preflight_steps=1", "trainer.cpu_threads=1",
                 f"output_dir={tmp_path / 'runs'}", f"data_dir={tmp_path / 'data'}"]) == 0
    out = capsys.readouterr().out
    for phase in ("pretrain", "extension", "decay"):
        assert f"phase {phase}: 1 row(s) x" in out
    assert out.count("s per micro-batch (forward + backward)") == 3 and out.count("memory per device, measured peak") == 3
    assert out.count("fits: micro_batch=8") == 3 and "whole recipe" in out
    assert list(tmp_path.iterdir()) == []  # no run directory, no data, no tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("objective, lengths", [("mlm", [2048]), ("clm", [2048, 600])])
def test_memory_model_is_within_a_quarter_of_the_measured_peak(objective, lengths):
    """The 150m model at 2K tokens (large enough that the process's fixed cost, ~0.4-0.8 GiB on CPU,
    is small next to it), one forward and backward in a fresh process."""
    from ettin.bench.memory import measure

    got = measure("150m", objective == "clm", lengths)
    config = model_config("150m", causal=objective == "clm")
    model = training_memory(config, lengths, got["targets"], autocast_bf16=False,
                            activation_checkpointing=False, loss_implementation="plain",
                            num_parameters=got["parameters"])
    predicted = model.weights + model.activations + model.loss + model.tied_embedding_gradient
    assert abs(predicted / got["peak"] - 1) < 0.25, (predicted, got["peak"])


def test_memory_model_counts_quadratic_scores_only_for_eager():
    common = dict(targets=300, autocast_bf16=False, activation_checkpointing=False,
                  loss_implementation="plain", num_parameters=1)
    sdpa = model_config("150m", causal=False)
    assert training_memory(sdpa, [1024], **common).quadratic_attention == 0
    assert training_memory(sdpa, [256, 100], **common).quadratic_attention == 0  # a mask: still none
    eager = model_config("150m", causal=False, attn_implementation="eager")
    assert training_memory(eager, [256, 100], **common).quadratic_attention == \
        22 * (2 * 256 * 12 * 256 * 4 + 2 * 256 * 2 * 768 * 4)


def test_start_warns_of_a_micro_batch_that_cannot_fit_and_of_quadratic_attention(monkeypatch):
    import ettin.train.preflight as preflight
    from ettin.train.config import compose
    from ettin.train.plan import plan_phase

    monkeypatch.setattr(preflight, "free_memory", lambda device: 16 * 2**30)
    cfg = compose("encoder_150m", ["trainer.accelerator=cpu", "model.attn_implementation=eager"])
    warnings = preflight.startup_warnings(plan_phase(cfg, "extension", None, [], fresh_optimizer=False))
    assert len(warnings) == 2
    assert warnings[0].startswith("phase extension: DOES NOT FIT: micro_batch=16 needs")
    assert "16.0 GiB free" in warnings[0] and "trainer.strategy=fsdp" not in warnings[0]
    assert "grow with the square of the row length (8000 tokens" in warnings[1]
    sdpa = compose("encoder_150m", ["trainer.accelerator=cpu", "phases.extension.micro_batch=1"])
    assert preflight.startup_warnings(plan_phase(sdpa, "extension", None, [], fresh_optimizer=False)) == []
