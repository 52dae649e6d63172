"""Sizing a run to a time budget: measured steps, then epochs (and a smaller input size if needed)."""

from __future__ import annotations

import pytest

from bincount import calibrate


def test_plan_fits_the_budget_and_falls_back_to_a_smaller_size(monkeypatch):
    rates = {96: 100.0, 64: 250.0}  # images/s as measured at each size
    monkeypatch.setattr(calibrate, "measure", lambda arch, size, *a, **k: (rates[size], "float32"))
    # 540 train + 180 val images at 96 px: 1.25 * (540 + 0.35 * 180) / 100 = 7.54 s an epoch
    roomy = calibrate.plan("resnet18", 96, 64, 6, True, 540, 180, budget_s=300, max_epochs=40)
    assert (roomy.image_size, roomy.epochs) == (96, 39)
    assert roomy.seconds == pytest.approx(39 * 7.5375) and roomy.seconds <= 300
    capped = calibrate.plan("resnet18", 96, 64, 6, True, 540, 180, budget_s=3000, max_epochs=40)
    assert capped.epochs == 40  # never more than configured
    # 120 s fits only 15 epochs at 96 px (< 20): 64 px fits 39
    tight = calibrate.plan("resnet18", 96, 64, 6, True, 540, 180, budget_s=120, max_epochs=40)
    assert (tight.image_size, tight.epochs) == (64, 39)
    assert "250 training images/s at 64 px (float32) here: 39 epochs of 540 images" in tight.describe(540)


def test_measure_times_real_training_steps():
    rate, precision = calibrate.measure("mobilenet_v3_small", 32, 8, 6, amp=False, steps=1)
    assert rate > 0 and precision == "float32"


def test_the_plan_never_trades_quality_below_the_floor(monkeypatch):
    """A busy CPU once got 1 epoch (all warm-up: a model at chance); the floor is the warm-up plus six epochs,
    even over the budget, and the plan says so."""
    monkeypatch.setattr(calibrate, "measure", lambda arch, size, *a, **k: ({96: 10.0, 64: 20.0}[size], "float32"))
    slow = calibrate.plan("resnet18", 96, 64, 6, True, 540, 180, budget_s=120, max_epochs=40, warmup_epochs=2)
    assert slow.image_size == 64  # the smaller input first
    assert slow.epochs == 2 + calibrate.AFTER_WARMUP and slow.over_budget
    assert slow.seconds > 120 and "over the budget" in slow.describe(540)
    assert calibrate.floor_epochs(2, 3) == 3  # never more than configured


def test_replan_from_the_first_epoch_keeps_close_plans_and_corrects_far_ones():
    planned = calibrate.Plan(epochs=20, image_size=64, images_per_s=100, precision="float32", seconds=120)
    assert calibrate.replan(planned, first_epoch_s=6.5, budget_s=120, max_epochs=40, warmup_epochs=2) == 20
    # the first epoch took 15 s, not 6: 1 + 105 / 15 = 8 epochs
    assert calibrate.replan(planned, first_epoch_s=15, budget_s=120, max_epochs=40, warmup_epochs=2) == 8
    # never below the floor, however slow
    assert calibrate.replan(planned, first_epoch_s=60, budget_s=120, max_epochs=40, warmup_epochs=2) == 8
    # faster than measured: more epochs, never more than configured
    assert calibrate.replan(planned, first_epoch_s=2, budget_s=120, max_epochs=40, warmup_epochs=2) == 40


def test_measure_reports_its_progress():
    steps = []
    calibrate.measure("mobilenet_v3_small", 32, 4, 6, amp=False, steps=2, on_step=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
