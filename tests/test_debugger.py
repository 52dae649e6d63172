"""The local Debugger rule checks: hand-made numbers, then a real smdebug trial."""

from __future__ import annotations

import json

from bincount import debugger


def epochs(pairs):
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(pairs)]


def test_rules_on_hand_made_numbers():
    assert debugger.vanishing_gradient({"fc.weight": [(0, 1e-3), (5, 1e-9)]})["status"] == "IssuesFound"
    assert debugger.vanishing_gradient({"fc.weight": [(0, 1e-3), (5, 1e-4)]})["status"] == "NoIssuesFound"
    assert debugger.vanishing_gradient({})["status"] == "NotRun"

    he = (2 ** 0.5 / 576 ** 0.5, 576, 1152)  # std, fan_in, fan_out of a He-initialised 3x3 conv 64 -> 128
    depthwise = (2 ** 0.5 / 14400 ** 0.5, 25, 14400)  # He fan_out mode, 5x5 depthwise over 576 channels
    assert debugger.poor_weight_initialization({"conv": he, "dw": depthwise})["status"] == "NoIssuesFound"
    assert debugger.poor_weight_initialization({"conv": he, "big": (1.0, 576, 1152)})["status"] == "IssuesFound"
    assert debugger.poor_weight_initialization({"tiny": (1e-4, 576, 1152)})["status"] == "IssuesFound"
    assert debugger.poor_weight_initialization({"zeros": (0.0, 64, 64)})["status"] == "IssuesFound"

    assert debugger.loss_not_decreasing([2.0, 1.9, 1.5, 1.2], "t")["status"] == "NoIssuesFound"
    assert debugger.loss_not_decreasing([1.5, 1.6, 1.5, 1.7], "t")["status"] == "IssuesFound"

    assert debugger.overfit(epochs([(1.0, 1.05), (0.8, 0.85)]))["status"] == "NoIssuesFound"
    assert debugger.overfit(epochs([(1.0, 1.05), (0.5, 0.9)]))["status"] == "IssuesFound"
    assert debugger.overfit(epochs([(1.0, 3.0), (0.8, 0.82)]), warmup_epochs=1)["status"] == "NoIssuesFound"

    falling = epochs([(2 - 0.1 * i, 2 - 0.1 * i) for i in range(12)])
    assert debugger.overtraining(falling)["status"] == "NoIssuesFound"
    flat_val = epochs([(2 - 0.1 * i, 1.0) for i in range(12)])
    assert debugger.overtraining(flat_val)["status"] == "IssuesFound"


def test_rules_read_the_tensors_train_py_saved(trained_run):
    """The session's trained run: `bincount train` checked its smdebug tensors and saved reports/rules.json."""
    out = trained_run.out
    rules = {f["rule"]: f for f in out["rules"]}
    assert set(rules) == {"VanishingGradient", "PoorWeightInitialization", "LossNotDecreasing", "Overfit",
                          "Overtraining"}
    assert rules["VanishingGradient"]["source"] == "smdebug"
    assert rules["VanishingGradient"]["status"] == "NoIssuesFound"
    assert rules["PoorWeightInitialization"]["status"] == "NoIssuesFound"
    assert rules["LossNotDecreasing"]["source"] == "smdebug"
    saved = json.loads((trained_run.workdir / "reports" / "rules.json").read_text())
    assert saved["run"] == out["run"] and len(saved["findings"]) == 5


def test_check_without_saved_tensors_uses_the_epoch_log(tmp_path):
    meta = {"arch": "mobilenet_v3_small", "num_classes": 6, "hyperparameters": {"warmup_epochs": 0}}
    history = epochs([(1.8, 1.9), (1.6, 1.7)])
    findings = {f["rule"]: f for f in debugger.check(tmp_path / "missing", history, meta, {"overfit": False})}
    assert "Overfit" not in findings and len(findings) == 4
    assert findings["VanishingGradient"]["status"] == "NotRun"
    assert findings["PoorWeightInitialization"]["status"] == "NotRun"
    assert findings["LossNotDecreasing"] == {"rule": "LossNotDecreasing", "status": "NoIssuesFound",
                                             "detail": "mean loss 1.8000 -> 1.6000 (first/last 1 values)",
                                             "source": "epoch log"}
    assert findings["Overtraining"]["status"] == "NoIssuesFound"
    json.dumps(findings)  # JSON-ready for reports/rules.json
