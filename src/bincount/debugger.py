"""Local Debugger findings: the checks SageMaker's built-in rules make, over a local run's saved tensors.

The open-source smdebug has the trial API but not the built-in rules, so these are small re-statements
with the built-in rules' default thresholds. Inputs: the tensors train.py's smdebug hook saved under
<run>/debug (reductions of weights and gradients, the loss values, every `debugger_interval` steps),
read with smdebug.trials.create_trial, and the run's epoch metrics.

- VanishingGradient (threshold 1e-7): some layer's mean |gradient| falls below the threshold at a saved
  training step.
- PoorWeightInitialization (threshold 10): at the first saved step a conv/linear layer's weight std
  scaled by sqrt(fan_in) and by sqrt(fan_out) (about 1 for He/Glorot-style initialisation in either
  mode) both lie outside [1/10, 10], or a layer's weights are all equal (symmetric: nothing breaks the tie). SageMaker's rule compares
  activation variances across layers; weights and fan-in are what a local run saves cheaply.
- LossNotDecreasing (num_steps 10, diff_percent 0.1): the mean training loss over the last num_steps
  saved steps is not diff_percent % below the mean over the first num_steps.
- Overfit (ratio_threshold 0.1, patience 1): (val_loss - train_loss) / train_loss stays above the
  ratio for the last `patience` epochs (per epoch, not per step; warm-up epochs skipped).
- Overtraining (patience_validation 10, patience_train 5, delta 0.01): training went on for more than
  `patience_validation` epochs after the validation loss last improved by delta, or for more than
  `patience_train` epochs after the training loss last improved by delta.

Each finding is a `Finding`: {"rule", "status": IssuesFound | NoIssuesFound | NotRun, "detail", "source"},
the shape the SageMaker backend gives its rule evaluations too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypedDict

from bincount.workspace import Workspace, atomic_write_text

# The built-in Debugger rules, for both backends: settings.sagemaker.rules field (also the SDK's
# rule_configs function) -> (SageMaker rule name, the tensor collections the rule reads on SageMaker).
RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vanishing_gradient": ("VanishingGradient", ("gradients",)),
    "overfit": ("Overfit", ("losses",)),
    "overtraining": ("Overtraining", ("losses",)),
    "poor_weight_initialization": ("PoorWeightInitialization", ("relu_input",)),
    "loss_not_decreasing": ("LossNotDecreasing", ("losses",)),
}
VANISHING_THRESHOLD = 1e-7
INIT_THRESHOLD = 10.0
LOSS_NUM_STEPS, LOSS_DIFF_PERCENT = 10, 0.1
OVERFIT_RATIO, OVERFIT_PATIENCE = 0.1, 1
OVERTRAIN_PATIENCE_VAL, OVERTRAIN_PATIENCE_TRAIN, OVERTRAIN_DELTA = 10, 5, 0.01


class Finding(TypedDict):
    rule: str  # e.g. LossNotDecreasing
    status: str  # IssuesFound | NoIssuesFound | NotRun locally; SageMaker's RuleEvaluationStatus there
    detail: str
    source: str  # smdebug | epoch log (local) | SageMaker


def finding(rule: str, issues: bool | None, detail: str, source: str) -> Finding:
    status = "NotRun" if issues is None else "IssuesFound" if issues else "NoIssuesFound"
    return {"rule": rule, "status": status, "detail": detail, "source": source}


# -- checks over plain numbers (unit-testable) ------------------------------------------------------
def vanishing_gradient(grad_abs_means: dict[str, list[tuple[int, float]]], threshold: float = VANISHING_THRESHOLD):
    low = [(name, step, v) for name, series in grad_abs_means.items() for step, v in series if v < threshold]
    if not grad_abs_means:
        return finding("VanishingGradient", None, "no gradients saved", "smdebug")
    if low:
        name, step, value = low[0]
        return finding("VanishingGradient", True, f"{len(low)} layer-steps below {threshold:g}, first {name} at "
                       f"step {step} ({value:.2e})", "smdebug")
    return finding("VanishingGradient", False, f"mean |gradient| >= {threshold:g} in all {len(grad_abs_means)} layers",
                   "smdebug")


def poor_weight_initialization(layers: dict[str, tuple[float, int, int]], threshold: float = INIT_THRESHOLD):
    """layers: name -> (std, fan_in, fan_out) of multi-dimensional weights at the first saved step."""
    if not layers:
        return finding("PoorWeightInitialization", None, "no weights saved", "smdebug")
    bad = []
    for name, (std, fan_in, fan_out) in layers.items():
        scaled = [std * math.sqrt(fan) for fan in (fan_in, fan_out)]
        if std == 0 or not any(1 / threshold <= s <= threshold for s in scaled):
            bad.append(f"{name} (std*sqrt(fan_in)={scaled[0]:.3g})")
    if bad:
        return finding("PoorWeightInitialization", True, f"{len(bad)} layers: {', '.join(bad[:3])}", "smdebug")
    return finding("PoorWeightInitialization", False,
                   f"all {len(layers)} layers within [1/{threshold:g}, {threshold:g}]", "smdebug")


def loss_not_decreasing(losses: list[float], source: str, num_steps: int = LOSS_NUM_STEPS,
                        diff_percent: float = LOSS_DIFF_PERCENT):
    if len(losses) < 2:
        return finding("LossNotDecreasing", None, "fewer than 2 saved losses", source)
    k = max(1, min(num_steps, len(losses) // 2))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    issues = not last <= first * (1 - diff_percent / 100)
    return finding("LossNotDecreasing", issues, f"mean loss {first:.4f} -> {last:.4f} (first/last {k} values)", source)


def overfit(history: list[dict[str, float]], warmup_epochs: int = 0, ratio: float = OVERFIT_RATIO,
            patience: int = OVERFIT_PATIENCE):
    rows = [h for h in history if h["epoch"] > warmup_epochs and h.get("train_loss", 0) > 0] or history
    if not rows:
        return finding("Overfit", None, "no epochs", "epoch log")
    gaps = [(h["val_loss"] - h["train_loss"]) / h["train_loss"] for h in rows]
    tail = gaps[-patience:]
    issues = len(tail) == patience and all(g > ratio for g in tail)
    return finding("Overfit", issues, f"(val_loss - train_loss) / train_loss = {gaps[-1]:.3f} at the last epoch "
                   f"(threshold {ratio:g})", "epoch log")


def _epochs_since_improvement(values: list[float], delta: float) -> int:
    best, since = math.inf, 0
    for value in values:
        if value < best - delta:
            best, since = value, 0
        else:
            since += 1
    return since


def overtraining(history: list[dict[str, float]], patience_val: int = OVERTRAIN_PATIENCE_VAL,
                 patience_train: int = OVERTRAIN_PATIENCE_TRAIN, delta: float = OVERTRAIN_DELTA):
    if not history:
        return finding("Overtraining", None, "no epochs", "epoch log")
    val = _epochs_since_improvement([h["val_loss"] for h in history], delta)
    train = _epochs_since_improvement([h["train_loss"] for h in history], delta)
    issues = val > patience_val or train > patience_train
    return finding("Overtraining", issues, f"{val} epochs since val_loss improved (limit {patience_val}), "
                   f"{train} since train_loss improved (limit {patience_train})", "epoch log")


# -- reading a run -----------------------------------------------------------------------------------
def read_trial(debug_dir: Path, meta: dict) -> dict[str, Any]:
    """Gradient abs means per layer, first-step weight stats with fan-in, training losses from smdebug."""
    import logging
    import os

    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "error")
    logging.getLogger("smdebug").setLevel(logging.ERROR)
    from smdebug.core.modes import ModeKeys
    from smdebug.trials import create_trial

    from bincount.container import net

    trial = create_trial(str(debug_dir))
    shapes = {name: tuple(p.shape) for name, p in
              net.build_model(meta["arch"], meta["num_classes"], "none").named_parameters()}

    def param(tensor_name: str) -> str:  # "ResNet_layer1.0.conv1.weight" -> "layer1.0.conv1.weight"
        return tensor_name.split("_", 1)[1] if "_" in tensor_name else tensor_name

    def reduction(tensor, step: int, name: str, abs_: bool = False) -> float:
        try:
            return float(tensor.reduction_value(step, name, abs=abs_, mode=ModeKeys.TRAIN))
        except Exception:  # noqa: BLE001 - a hook configured to save whole tensors instead
            import numpy as np

            value = np.asarray(tensor.value(step, mode=ModeKeys.TRAIN), dtype=float)
            value = np.abs(value) if abs_ else value
            return float(value.mean() if name == "mean" else value.var())

    grads: dict[str, list[tuple[int, float]]] = {}
    for name in trial.tensor_names(collection="gradients"):
        key = param(name.removeprefix("gradient/"))
        if len(shapes.get(key, ())) > 1:
            tensor = trial.tensor(name)
            grads[key] = [(s, reduction(tensor, s, "mean", True)) for s in tensor.steps(mode=ModeKeys.TRAIN)]
    layers: dict[str, tuple[float, int, int]] = {}
    for name in trial.tensor_names(collection="weights"):
        key = param(name)
        shape = shapes.get(key, ())
        tensor = trial.tensor(name)
        steps = tensor.steps(mode=ModeKeys.TRAIN)
        if len(shape) > 1 and steps:
            receptive = math.prod(shape[2:])
            layers[key] = (math.sqrt(max(reduction(tensor, steps[0], "variance"), 0.0)),
                           shape[1] * receptive, shape[0] * receptive)
    losses: list[float] = []
    for name in trial.tensor_names(collection="losses"):
        tensor = trial.tensor(name)
        losses = [float(tensor.value(s, mode=ModeKeys.TRAIN)) for s in tensor.steps(mode=ModeKeys.TRAIN)]
        break
    return {"grads": grads, "layers": layers, "losses": losses}


def check(debug_dir: Path | None, history: list[dict[str, float]], meta: dict,
          enabled: dict[str, bool] | None = None) -> list[Finding]:
    """Run the enabled checks; tensor checks need smdebug and a debug dir, the others use the epoch log."""
    enabled = enabled or dict.fromkeys(RULES, True)
    data: dict[str, Any] | None = None
    reason = "no tensors saved (smdebug hook off)"
    if debug_dir is not None and Path(debug_dir).is_dir():
        try:
            data = read_trial(Path(debug_dir), meta)
        except Exception as exc:  # noqa: BLE001 - smdebug is optional; fall back to the epoch log
            reason = f"smdebug trial unreadable ({type(exc).__name__}: {exc})"
    warmup = int(meta.get("hyperparameters", {}).get("warmup_epochs", 0) or 0)
    out = []
    for key, (rule, _) in RULES.items():
        if not enabled.get(key, True):
            continue
        if key == "vanishing_gradient":
            out.append(vanishing_gradient(data["grads"]) if data else finding(rule, None, reason, "smdebug"))
        elif key == "poor_weight_initialization":
            out.append(poor_weight_initialization(data["layers"]) if data else finding(rule, None, reason, "smdebug"))
        elif key == "loss_not_decreasing":
            if data and len(data["losses"]) >= 2:
                out.append(loss_not_decreasing(data["losses"], "smdebug"))
            else:
                out.append(loss_not_decreasing([h["train_loss"] for h in history], "epoch log"))
        elif key == "overfit":
            out.append(overfit(history, warmup))
        else:
            out.append(overtraining(history))
    return out


def check_run(settings, run_dir: Path, history: list[dict[str, float]] | None = None) -> list[Finding]:
    """Findings for a local run dir (model/meta.json, debug/); saved to reports/rules.json."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    history = history if history is not None else meta.get("history", [])
    enabled = {key: getattr(settings.sagemaker.rules, key) for key in RULES}
    findings = check(run_dir / "debug", history, meta, enabled)
    report = {"run": run_dir.name, "findings": findings}
    atomic_write_text(Workspace(settings.workdir).reports / "rules.json", json.dumps(report, indent=2) + "\n")
    return findings


def rules_table(findings: list[Finding]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Debugger rules (local)", title_justify="left")
    for column in ("rule", "status", "detail"):
        table.add_column(column)
    colours = {"IssuesFound": "yellow", "NoIssuesFound": "green", "NotRun": "dim"}
    for f in findings:
        table.add_row(f["rule"], Text(f["status"], style=colours[f["status"]]), f["detail"])
    return table
