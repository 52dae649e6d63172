"""train.py's loop: a diverged run (a finite but absurd loss) stops like a non-finite one (issue 23.5)."""

from __future__ import annotations

import math

import pytest

from bincount.container import loop
from bincount.container.hparams import UsageError


def test_an_absurd_loss_stops_the_run_as_diverged_and_a_poor_one_does_not():
    limit = loop.loss_limit(6, 0.5)
    assert limit == pytest.approx(100 * (math.log(6) + 2.5))
    guess = {"train_loss": math.log(6) + 2.5, "val_loss": 9.0, "val_acc": 0.17}  # at chance, overconfident: trains on
    loop.check_finite(3, guess, 0.001, limit)
    with pytest.raises(UsageError, match=r"training diverged at epoch 4 \(val_loss=1.2e\+10, over 429") as err:
        loop.check_finite(4, {"train_loss": 2.0, "val_loss": 1.2e10, "val_acc": 0.17}, 0.5, limit)
    assert "lower the learning rate (lr 0.5)" in str(err.value)
    with pytest.raises(UsageError, match="not finite"):
        loop.check_finite(1, {"train_loss": float("nan")}, 0.5, limit)
