"""Whether a model's accuracy means anything: its test accuracy against chance on the same images.

Chance is what always answering the most frequent count would score (the majority rate of the test
split): 1/6 for six balanced counts. A model is near chance when its accuracy is below twice that, or
less than 15 points above it (but never more than halfway from chance to perfect: with a 50% majority
count, 95% is not near chance); its predictions then say little more than the class frequencies, and
nothing built on them (an audit, a deployment) should be trusted.
"""

from __future__ import annotations

MARGIN = 0.15  # points above chance, at least


def chance(confusion: list[list[int]]) -> float:
    """The majority rate of the true counts (rows of the confusion matrix)."""
    totals = [sum(row) for row in confusion]
    return max(totals) / sum(totals) if sum(totals) else 0.0


def near_chance(accuracy: float, chance_rate: float) -> bool:
    """True when `accuracy` is too close to chance to trust the model."""
    return accuracy < min(max(2 * chance_rate, chance_rate + MARGIN), chance_rate + (1 - chance_rate) / 2)
