"""schedule.py: the LR of each group at warm-up, middle and end."""

import pytest
import torch

import schedule
from config import PARAM_GROUPS, TrainingConfig


def lrs(training, total_steps):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW([{"params": [p], "lr": training.peak_lr(g), "name": g}
                             for p, g in zip(params, PARAM_GROUPS)])
    sched = schedule.build(opt, training, total_steps)
    history = []
    for _ in range(total_steps):
        history.append({g["name"]: g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
    return history


def test_cosine_warms_up_then_decays_to_floor():
    t = TrainingConfig(lr_connector=1e-3, lr_dino=1e-5, lr_llm=2e-5, warmup_ratio=0.1, schedule="cosine",
                       min_lr_ratio=0.1)
    h = lrs(t, 101)
    assert h[0]["llm"] == pytest.approx(2e-5 / 10)  # warm-up is linear from ~0
    assert h[4]["llm"] == pytest.approx(2e-5 / 2)
    assert h[9]["llm"] == pytest.approx(2e-5)  # peak at the end of warm-up
    assert h[55]["llm"] == pytest.approx(2e-5 * 0.55, rel=1e-6)  # half-way down the cosine: (1 + floor) / 2
    assert h[-1]["llm"] == pytest.approx(2e-6) and h[-1]["connector"] == pytest.approx(1e-4)
    assert all(a["dino"] >= b["dino"] for a, b in zip(h[10:], h[11:]))


def test_constant_stays_at_peak():
    h = lrs(TrainingConfig(lr_llm=3e-5, warmup_ratio=0.2, schedule="constant"), 50)
    assert h[4]["llm"] == pytest.approx(3e-5 / 2)
    assert h[10]["llm"] == h[30]["llm"] == h[-1]["llm"] == pytest.approx(3e-5)


def test_converging_connector_falls_backbones_rise_to_target():
    t = TrainingConfig(lr_connector=1e-3, lr_dino=1e-5, lr_llm=1e-5, target_lr=3e-5, warmup_ratio=0.1,
                       schedule="converging")
    h = lrs(t, 101)
    assert h[9]["connector"] == pytest.approx(1e-3) and h[9]["dino"] == pytest.approx(1e-5)
    assert h[55]["connector"] == pytest.approx((1e-3 + 3e-5) / 2)
    assert h[55]["llm"] == pytest.approx((1e-5 + 3e-5) / 2)
    for g in PARAM_GROUPS:
        assert h[-1][g] == pytest.approx(3e-5)
    assert all(a["connector"] >= b["connector"] and a["llm"] <= b["llm"] for a, b in zip(h[10:], h[11:]))
