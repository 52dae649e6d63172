"""The training and tuning views: plain lines as they happen off a terminal, a view that fits the screen on one."""

from __future__ import annotations

import io

from rich.console import Console

from bincount.container.epochlog import format_epoch_line, format_progress_line
from bincount.trainview import TrainingView, TuningView


def metrics(epoch: int) -> dict[str, float]:
    return {"train_loss": 1.0 / epoch, "val_loss": 1.1 / epoch, "val_acc": 0.9 - 0.01 * abs(epoch - 9),
            "val_rmse": 1.0 / epoch, "lr": 0.001}


def test_off_a_terminal_each_epoch_is_one_plain_line_printed_as_it_happens():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    with TrainingView(3, console=console) as view:
        view.line(format_progress_line(1, 1, 10, 50.0))
        assert out.getvalue() == ""  # progress inside an epoch is for terminals only
        for epoch in (1, 2):
            returned = view.line(format_epoch_line(epoch, **metrics(epoch)) + "\n")
            assert returned["epoch"] == epoch
            assert out.getvalue().count("\n") == epoch  # written before the next line arrives
        assert view.line("[train] some other line") is None
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("epoch 1/3  train_loss 1.0000  val_loss 1.1000  val_acc 0.8200")
    assert "ETA" in lines[1] and "\x1b" not in out.getvalue()  # no control codes in a log file


def test_in_a_terminal_the_view_keeps_the_last_epochs_and_fits_the_screen():
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=16)
    view = TrainingView(40, console=console)  # not entered: render the view by hand
    for epoch in range(1, 41):
        view.line(format_epoch_line(epoch, **metrics(epoch)))
    view.line(format_progress_line(41, 3, 10, 123.0))
    screen = Console(file=io.StringIO(), width=120, height=16, force_terminal=False)
    with screen.capture() as capture:
        screen.print(view._render())
    text = capture.get()
    assert len(text.splitlines()) <= 16  # never taller than the screen, so it never freezes with "..."
    assert "40/40" in text and "1/40 " not in text  # the newest epochs, not the first ones
    assert "epoch 40/40" in text and "best val_acc 0.900 (epoch 9)" in text
    assert "step 3/10 · 123 images/s" in text


def test_tuning_view_counts_trials_and_keeps_the_best():
    out = io.StringIO()
    view = TuningView(3, epochs=2, objective="val_rmse", maximize=False,
                      console=Console(file=out, force_terminal=False, width=200))
    with view:
        view.start(1, {"lr": 0.01, "batch_size": 32})
        view.line(format_epoch_line(1, **metrics(1)))
        view.end(1, 0.8, "done")
        view.start(2, {"lr": 0.001, "batch_size": 64})
        view.end(2, 0.5, "done")
        view.start(3, {"lr": 0.1, "batch_size": 64})
        view.end(3, 0.9, "pruned")
    text = out.getvalue()
    assert "trial 1/3: lr=0.01 batch_size=32" in text
    assert "trial 2 done: val_rmse=0.5000 · trial 2/3 · best val_rmse 0.5000 (trial 2) · ETA" in text
    assert "trial 3 pruned: val_rmse=0.9000 · trial 3/3 · best val_rmse 0.5000 (trial 2)" in text
