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


def test_check_reads_a_real_smdebug_trial(tmp_path):
    import torch
    import smdebug.pytorch as smd
    from smdebug.core.reduction_config import ReductionConfig
    from smdebug.core.save_config import SaveConfig

    from bincount.container import net, smdebug_compat

    smdebug_compat.install()
    torch.manual_seed(0)
    model = net.build_model("mobilenet_v3_small", 6)
    hook = smd.Hook(out_dir=str(tmp_path / "debug"), save_config=SaveConfig(save_interval=1),
                    reduction_config=ReductionConfig(reductions=["mean", "variance"], abs_reductions=["mean"]),
                    include_collections=["weights", "gradients", "losses"])
    hook.get_collection("losses").reduction_config = ReductionConfig()
    loss_fn = torch.nn.CrossEntropyLoss()
    hook.register_module(model)
    hook.register_loss(loss_fn)
    hook.set_mode(smd.modes.TRAIN)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    hook.close()

    meta = {"arch": "mobilenet_v3_small", "num_classes": 6, "hyperparameters": {"warmup_epochs": 0}}
    history = epochs([(1.8, 1.9), (1.6, 1.7)])
    findings = {f["rule"]: f for f in debugger.check(tmp_path / "debug", history, meta)}
    assert findings["VanishingGradient"]["source"] == "smdebug"
    assert findings["VanishingGradient"]["status"] == "NoIssuesFound"
    assert findings["PoorWeightInitialization"]["status"] == "NoIssuesFound"
    assert findings["LossNotDecreasing"]["source"] == "smdebug"
    assert findings["Overtraining"]["status"] == "NoIssuesFound"
    json.dumps(findings)  # JSON-ready for reports/rules.json

    # Without saved tensors the tensor rules say NotRun and the loss rules use the epoch log.
    offline = {f["rule"]: f for f in debugger.check(None, history, meta, {"overfit": False})}
    assert "Overfit" not in offline
    assert offline["VanishingGradient"]["status"] == "NotRun"
    assert offline["LossNotDecreasing"]["source"] == "epoch log"
