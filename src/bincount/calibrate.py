"""Size a training run to a time budget on this machine, without trading quality below a floor.

CPUs differ several-fold for the same run (native bfloat16 or not, cores, load), so a demo that
promises "about two minutes" measures before it trains: it times a handful of real training steps
(the same model, input size, batch and precision train.py will use, forward and backward) and picks
the number of epochs that fits the budget. Quality comes first: if the configured input size fits
fewer than `min_epochs`, a smaller size is tried; and never fewer than `floor_epochs(warmup)` epochs
are planned (the warm-up plus enough epochs of the real schedule to learn), even when that runs over
the budget. After the first real epoch, `replan` corrects the plan from the measured time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

EVAL_COST = 0.35  # a validation image costs about a third of a training image (forward only, no augmentation)
OVERHEAD = 1.25  # data loading, EMA, checkpoints and start-up on top of the timed steps
AFTER_WARMUP = 6  # epochs of the real schedule, at least, after the warm-up


def floor_epochs(warmup_epochs: int, max_epochs: int) -> int:
    """The fewest epochs a plan may choose: the warm-up plus AFTER_WARMUP (or all configured ones)."""
    return min(max_epochs, warmup_epochs + AFTER_WARMUP)


@dataclass(frozen=True)
class Plan:
    """What the calibration chose, and what it measured."""

    epochs: int
    image_size: int  # the image side it plans for, pixels
    images_per_s: float
    precision: str
    seconds: float  # the predicted training time
    over_budget: bool = False  # the floor of epochs needs more than the budget here

    def describe(self, train_images: int) -> str:
        text = (f"{self.images_per_s:.0f} training images/s at {self.image_size} px ({self.precision}) here: "
                f"{self.epochs} epochs of {train_images} images, about {self.seconds / 60:.1f} min")
        if self.over_budget:
            text += " (over the budget: fewer epochs would not learn enough, so the demo takes longer here)"
        return text


def measure(arch: str, image_size: int, batch_size: int, num_classes: int, amp: bool, steps: int = 4,
            on_step: Callable[[int, int], None] | None = None) -> tuple[float, str]:
    """Training images/s of one forward+backward+step at this size, after one warm-up step; and the precision.

    on_step(done, total) is called after each step (the warm-up is step 1), for a progress display."""
    import torch

    from bincount.container import net
    from bincount.container.loop import cpu_bf16

    bf16 = amp and cpu_bf16()
    model = net.build_model(arch, num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,))
    model.train()

    def step(done: int) -> None:
        with torch.autocast("cpu", enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(done, steps + 1)

    step(1)  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for done in range(steps):
        step(done + 2)
    return steps * batch_size / (time.perf_counter() - started), "bfloat16" if bf16 else "float32"


def plan(arch: str, image_size: int, batch_size: int, num_classes: int, amp: bool, train_images: int,
         val_images: int, budget_s: float, max_epochs: int, warmup_epochs: int = 0, min_epochs: int = 20,
         smallest: int = 64, on_step: Callable[[int, int, int], None] | None = None) -> Plan:
    """The most epochs (at most max_epochs) that fit budget_s, at image_size or, if that fits fewer than
    min_epochs, at a smaller size down to `smallest` px; never fewer than floor_epochs(warmup_epochs).

    on_step(image_size, done, total) reports the measurement's progress."""
    sizes = [image_size] + ([smallest] if smallest < image_size else [])
    floor = floor_epochs(warmup_epochs, max_epochs)
    best = None
    for size in sizes:
        report = None if on_step is None else (lambda done, total, size=size: on_step(size, done, total))
        rate, precision = measure(arch, size, min(batch_size, max(train_images, 1)), num_classes, amp, on_step=report)
        per_epoch = OVERHEAD * (train_images + EVAL_COST * val_images) / rate
        fits = min(max_epochs, int(budget_s / per_epoch))
        epochs = max(floor, fits)
        best = Plan(epochs, size, rate, precision, epochs * per_epoch, over_budget=fits < floor)
        if fits >= min(min_epochs, max_epochs):
            break
    assert best is not None
    return best


def replan(planned: Plan, first_epoch_s: float, budget_s: float, max_epochs: int, warmup_epochs: int) -> int:
    """The epochs to train, given that the first (start-up included) took first_epoch_s: as many as the rest of
    the budget fits at that pace, within [floor_epochs, max_epochs]; unchanged when it is within 20%."""
    fits = 1 + int(max(0.0, budget_s - first_epoch_s) / max(first_epoch_s, 1e-6))
    epochs = max(floor_epochs(warmup_epochs, max_epochs), min(max_epochs, fits))
    if abs(epochs - planned.epochs) <= 0.2 * planned.epochs:
        return planned.epochs
    return epochs
