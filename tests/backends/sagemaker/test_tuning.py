"""`tune --backend sagemaker`'s warm start under moto: a parent only where AWS's documented rules allow it
(HyperParameterTuningJobWarmStartConfig: same objective metric, same static plus tuned hyperparameters;
IdenticalDataAndAlgorithm also the same data and image, else TransferLearning), checked on the requests sent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bincount_test_sagemaker", Path(__file__).with_name("test_sagemaker.py"))
_sagemaker_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sagemaker_tests)
sm = _sagemaker_tests.sm  # the moto SageMaker fixture with request capture (shared, not copied)
BUCKET, make_settings, record_channels = _sagemaker_tests.BUCKET, _sagemaker_tests.make_settings, _sagemaker_tests.record_channels


def _names(req):
    ranges = req["HyperParameterTuningJobConfig"]["ParameterRanges"]
    tuned = {r["Name"] for kind in ranges.values() for r in kind}
    return set(req["TrainingJobDefinition"]["StaticHyperParameters"]) | tuned


def test_warm_start_only_from_a_compatible_parent(sm, tmp_path, capsys):
    import boto3

    from bincount.backends.sagemaker import tuning
    from bincount.workspace import Workspace

    settings = make_settings(tmp_path, **{"tune.wait": False})
    record_channels(settings)
    first = tuning.tune(settings)
    parent_req = sm.last("CreateHyperParameterTuningJob")

    # the objective changed: AWS refuses a parent with another objective metric; start cold, say why
    capsys.readouterr()
    rmse = tuning.tune(make_settings(tmp_path, **{"tune.wait": False, "tune.objective": "val_rmse"}))
    req = sm.last("CreateHyperParameterTuningJob")
    assert "WarmStartConfig" not in req
    assert req["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]["MetricName"] == "val_rmse"
    err = capsys.readouterr().err
    assert f"no warm start from tuning job {first.job}: its objective is val_acc" in err and "starting cold" in err

    # back to val_acc: the recorded job (val_rmse) is no parent either
    second = tuning.tune(settings)
    assert "WarmStartConfig" not in sm.last("CreateHyperParameterTuningJob")

    # the same objective, hyperparameters, data and image: IdenticalDataAndAlgorithm
    tuning.tune(settings)
    req = sm.last("CreateHyperParameterTuningJob")
    assert req["WarmStartConfig"] == {"ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": second.job}],
                                      "WarmStartType": "IdenticalDataAndAlgorithm"}
    assert _names(req) == _names(parent_req)  # what the rule asks: the same set of hyperparameters
    assert rmse.job != second.job

    # train.pretrained from S3 adds a static hyperparameter (weights_source) and a channel: cold, said why
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key="w/resnet.pth", Body=b"x")
    third = Workspace(tmp_path).state().tuning.job
    capsys.readouterr()
    tuning.tune(make_settings(tmp_path, **{"tune.wait": False, "train.pretrained": f"s3://{BUCKET}/w/resnet.pth"}))
    req = sm.last("CreateHyperParameterTuningJob")
    assert "WarmStartConfig" not in req and len(_names(req)) == len(_names(parent_req)) + 1
    err = capsys.readouterr().err
    assert f"no warm start from tuning job {third}: its hyperparameters differ (added weights_source;" in err

    # the data changed (other channels), hyperparameters the same: TransferLearning from the compatible parent
    settings2 = make_settings(tmp_path, **{"tune.wait": False})
    tuning.tune(settings2)  # a plain parent again (cold: the recorded one has the weights hyperparameters)
    parent = Workspace(tmp_path).state().tuning.job
    Workspace(tmp_path).update_state(channels={s: f"s3://{BUCKET}/bincount/v2/{s}/" for s in ("train", "val", "test")})
    capsys.readouterr()
    tuning.tune(settings2)
    req = sm.last("CreateHyperParameterTuningJob")
    assert req["WarmStartConfig"] == {"ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": parent}],
                                      "WarmStartType": "TransferLearning"}
    assert "as TransferLearning: the channels changed" in capsys.readouterr().err
