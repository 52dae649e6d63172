"""How far to trust the model an audit uses: its own test accuracy, and its threshold checked on the val split.

An audit is only as good as its model: a 41% model's confident disagreements are mostly its own errors.
Before ranking, the audit reads the model's test and val accuracy from its meta.json (what training
recorded) and scores the val split (up to VAL_BINS bins, cached per model and split) to measure how often
the bins it would trust (confidence >= threshold) were right: the trusted-bin precision. It warns when
the model is near chance (bincount.quality) or that precision is below PRECISION_BOUND, and names the
lowest threshold that would reach the bound on val.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field

from bincount.config import Settings
from bincount.results import Result
from bincount.workspace import Workspace

VAL_BINS = 500  # val bins scored at most to check the threshold
PRECISION_BOUND = 0.9  # trusted val bins must be right at least this often
MIN_TRUSTED = 5  # a suggested threshold must keep at least this many val bins


class ModelQuality(Result):
    """The model an audit used and how far its answers can be trusted."""

    model: str = Field(description="the model dir, or the endpoint, the bins were scored with")
    made: str | None = Field(None, description="when the model was written (its meta.json's time, UTC ISO 8601)")
    test_acc: float | None = Field(None, description="share of exact counts on the test split, as training recorded it")
    val_acc: float | None = Field(None, description="share of exact counts on the val split, as training recorded it")
    chance: float | None = Field(None, description="accuracy of always answering the most frequent count of the "
                                  "test split (1/num_classes without one)")
    near_chance: bool | None = Field(None, description="test_acc too close to chance to trust the model")
    threshold: float = Field(description="the confidence threshold the audit used (0..1)")
    val_bins: int = Field(0, description="val bins scored to check the threshold (0: not checked)")
    val_trusted: int = Field(0, description="of them, bins with confidence >= threshold")
    val_precision: float | None = Field(None, description="share of trusted val bins whose count was right")
    val_source: str = Field("", description="how the threshold was checked")
    suggested_threshold: float | None = Field(
        None, description=f"lowest threshold whose trusted val bins were right >= {PRECISION_BOUND:.0%} of the time")
    warnings: list[str] = Field(default_factory=list, description="why the audit's ranking may not be trusted")

    @property
    def trusted(self) -> bool:
        return not self.warnings

    def lines(self) -> list[tuple[str, str]]:
        """(name, text) rows for the audit summary."""
        pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
        rows = [("model", self.model + (f" (made {self.made})" if self.made else ""))]
        if self.test_acc is not None:
            rows.append(("model test acc", f"{pct(self.test_acc)} (chance {pct(self.chance)}, recorded by training)"))
        else:
            rows.append(("model test acc", "unknown (no test metrics in the model's meta.json)"))
        if self.val_bins:
            rows.append(("threshold check", f"at {self.threshold:.2f}, trusted bins were right {pct(self.val_precision)} "
                                            f"of the time on val ({self.val_trusted} of {self.val_bins} val bins "
                                            f"trusted; {self.val_source})"))
        else:
            rows.append(("threshold check", self.val_source))
        if self.suggested_threshold is not None and self.suggested_threshold != self.threshold:
            rows.append(("suggested", f"--threshold {self.suggested_threshold:.2f} (trusted val bins right "
                                      f">= {PRECISION_BOUND:.0%})"))
        return rows


def model_made(model_dir: Path) -> str | None:
    meta = Path(model_dir) / "meta.json"
    try:
        return datetime.fromtimestamp(meta.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return None


def read_meta(model_dir: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(model_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def split_chance(ws: Workspace, split: str, num_classes: int | None) -> float | None:
    """The majority rate of a split's counts (1/num_classes without the split)."""
    from bincount.quality import chance

    counts: dict[int, int] = {}
    path = ws.split(split)
    try:
        with path.open() as fh:
            for line in fh:
                if line.strip():
                    count = json.loads(line).get("count")
                    if isinstance(count, int):
                        counts[count] = counts.get(count, 0) + 1
    except (OSError, ValueError, AttributeError):
        counts = {}
    if counts:
        return chance([[n] for n in counts.values()])
    return 1 / num_classes if num_classes else None


def precision_at(pairs: list[tuple[float, bool]], threshold: float) -> tuple[int, float | None]:
    trusted = [right for confidence, right in pairs if confidence >= threshold]
    return len(trusted), (sum(trusted) / len(trusted) if trusted else None)


def suggest(pairs: list[tuple[float, bool]]) -> float | None:
    """The lowest threshold (2 decimals) whose trusted val bins are right >= PRECISION_BOUND of the time."""
    for step in range(0, 101):
        t = step / 100
        n, precision = precision_at(pairs, t)
        if n >= MIN_TRUSTED and precision is not None and precision >= PRECISION_BOUND:
            return t
    return None


def assess(settings: Settings, target: Any, threshold: float, val: tuple[list[tuple[float, bool]], str] | None = None
           ) -> ModelQuality:
    """The model's recorded accuracy and its threshold checked on `val` ((confidence, right) of scored val bins,
    and how they were got; None: not checked); warnings when the model is too weak to audit with."""
    from bincount.predict import ModelTarget
    from bincount.quality import near_chance

    ws = Workspace(settings.workdir)
    meta, made, name = {}, None, getattr(target, "name", str(target))
    if isinstance(target, ModelTarget) and target.handlers is not None:
        model_dir = Path(target.handlers.model_dir)
        meta, made, name = read_meta(model_dir), model_made(model_dir), str(model_dir)
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    test_acc, val_acc = number(metrics.get("test_acc")), number(metrics.get("val_acc"))
    chance_rate = split_chance(ws, "test", meta.get("num_classes") if isinstance(meta.get("num_classes"), int) else None)
    quality = ModelQuality(model=name, made=made, test_acc=test_acc, val_acc=val_acc, chance=chance_rate,
                           threshold=threshold, val_source="not checked: a Batch Transform audit (audit the val split "
                                                           "with --source splits/val.jsonl to check it)")
    warnings = []
    if test_acc is not None and chance_rate is not None:
        quality.near_chance = near_chance(test_acc, chance_rate)
        if quality.near_chance:
            warnings.append(f"the model's test accuracy {test_acc:.1%} is near chance ({chance_rate:.1%}): its confident "
                            "disagreements are mostly its own errors; train a better model before acting on them")
    if val is not None:
        pairs, quality.val_source = val
        quality.val_bins = len(pairs)
        quality.val_trusted, quality.val_precision = precision_at(pairs, threshold)
        quality.suggested_threshold = suggest(pairs) if pairs else None
        if pairs and quality.val_precision is None:
            warnings.append(f"no val bin reached confidence {threshold:.2f}: every bin will go to a person")
        elif quality.val_precision is not None and quality.val_precision < PRECISION_BOUND:
            hint = (f"; --threshold {quality.suggested_threshold:.2f} reaches it" if quality.suggested_threshold is not None
                    else "; no threshold reaches it: the model is too weak to audit with")
            warnings.append(f"at {threshold:.2f}, trusted val bins were right only {quality.val_precision:.1%} of the "
                            f"time (bound {PRECISION_BOUND:.0%}){hint}")
    quality.warnings = warnings
    return quality
