"""Size a training run to a time budget on this machine: a few timed training steps, then the epochs.

CPUs differ several-fold for the same run (native bfloat16 or not, cores, load), so a demo that
promises "about two minutes" measures before it trains: it times a handful of real training steps
(the same model, input size, batch and precision train.py will use, forward and backward) and picks
the number of epochs that fits the budget. If even `min_epochs` at the configured size would not fit,
it tries a smaller input size first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

EVAL_COST = 0.35  # a validation image costs about a third of a training image (forward only, no augmentation)
OVERHEAD = 1.25  # data loading, EMA, checkpoints and start-up on top of the timed steps


@dataclass(frozen=True)
class Plan:
    """What the calibration chose, and what it measured."""

    epochs: int
    image_size: int
    images_per_s: float
    precision: str
    seconds: float  # the predicted training time

    def describe(self, train_images: int) -> str:
        return (f"{self.images_per_s:.0f} training images/s at {self.image_size} px ({self.precision}) here: "
                f"{self.epochs} epochs of {train_images} images, about {self.seconds / 60:.1f} min")


def measure(arch: str, image_size: int, batch_size: int, num_classes: int, amp: bool, steps: int = 4) -> tuple[float, str]:
    """Training images/s of one forward+backward+step at this size, after one warm-up step; and the precision."""
    import torch

    from bincount.container import net
    from bincount.container.loop import cpu_bf16

    bf16 = amp and cpu_bf16()
    model = net.build_model(arch, num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,))
    model.train()

    def step() -> None:
        with torch.autocast("cpu", enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: first-call allocations and kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started), "bfloat16" if bf16 else "float32"


def plan(arch: str, image_size: int, batch_size: int, num_classes: int, amp: bool, train_images: int,
         val_images: int, budget_s: float, max_epochs: int, min_epochs: int = 20, smallest: int = 64) -> Plan:
    """The most epochs (at most max_epochs) that fit budget_s, at image_size or, if that fits fewer than
    min_epochs, at a smaller size down to `smallest` px."""
    sizes = [image_size] + ([smallest] if smallest < image_size else [])
    best = None
    for size in sizes:
        rate, precision = measure(arch, size, min(batch_size, max(train_images, 1)), num_classes, amp)
        per_epoch = OVERHEAD * (train_images + EVAL_COST * val_images) / rate
        epochs = max(1, min(max_epochs, int(budget_s / per_epoch)))
        best = Plan(epochs, size, rate, precision, epochs * per_epoch)
        if epochs >= min(min_epochs, max_epochs):
            break
    assert best is not None
    return best
