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
