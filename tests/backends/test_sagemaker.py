"""The SageMaker control plane under moto: the requests that reach SageMaker are what we check.

moto gets help where it cannot act like SageMaker: the SDK's waits are made instant, moto's
sagemaker-runtime is patched for binary bodies, tuning jobs report a realistic best trial, and the
model.tar.gz a finished job "wrote" is put in S3 by the test (a real one, from a local training).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError
from bincount.state import SageMakerEndpoint, SageMakerTraining

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "bincount-test"
BEST = {"lr": "0.0123", "weight_decay": "0.0002", "batch_size": '"16"',
        "_tuning_objective_metric": '"val_acc"', "sagemaker_estimator_module": '"sagemaker.pytorch"'}


def make_settings(workdir: Path, **overrides):
    base = {"workdir": workdir, "backend": "sagemaker", "s3.bucket": BUCKET, "sagemaker.role": ROLE,
            "train.epochs": 1, "train.image_size": 32, "train.batch_size": 16, "tune.max_jobs": 4}
    return load_settings(overrides={**base, **overrides}, environ={})


class _FastTime:
    """`time` for sagemaker.session: sleeping returns at once (moto jobs are done when created)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(_seconds):
        return None


@pytest.fixture
def sm(monkeypatch):
    """moto's SageMaker/S3 (in-process), a bucket, captured SageMaker requests, no way out to the network."""
    from bincount.backends import sm_estimator

    sm_estimator.load_sdk()
    import boto3
    import sagemaker.session
    import sagemaker.telemetry.telemetry_logging as telemetry
    from moto import mock_aws
    from moto.sagemaker import models as sm_models
    from moto.sagemakerruntime.responses import SageMakerRuntimeResponse

    monkeypatch.setattr(sagemaker.session, "time", _FastTime())
    telemetry_calls = []
    monkeypatch.setattr(telemetry, "_requests_helper", lambda url, timeout: telemetry_calls.append(url))

    real_connect = socket.socket.connect

    def loopback_only(self, address):  # nothing may leave this machine
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise OSError(f"test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)

    # moto's sagemaker-runtime decodes every body as UTF-8 and json.dumps it to key its results:
    # binary bodies (an image) crash it. Keep the raw bytes and key on their digest instead.
    real_setup = SageMakerRuntimeResponse.setup_class
    real_invoke = SageMakerRuntimeResponse.invoke_endpoint

    def setup_raw(self, request, full_url=None, headers=None, use_raw_body=False):
        return real_setup(self, request, full_url, headers, use_raw_body=True)

    def invoke_binary(self):
        if isinstance(self.body, bytes):
            self.body = hashlib.sha256(self.body).hexdigest()
        return real_invoke(self)

    monkeypatch.setattr(SageMakerRuntimeResponse, "setup_class", setup_raw)
    monkeypatch.setattr(SageMakerRuntimeResponse, "invoke_endpoint", invoke_binary)

    # moto's tuning jobs report a hard-coded best trial ({"string": ...}); make it look like SageMaker's.
    real_init = sm_models.HyperParameterTuningJob.__init__

    def tuning_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.best_training_job.update({
            "TrainingJobName": f"{self.hyper_parameter_tuning_job_name}-003-abcdef12",
            "TunedHyperParameters": dict(BEST),
            "FinalHyperParameterTuningJobObjectiveMetric": {"Type": "Maximize", "MetricName": "val_acc", "Value": 0.75},
        })

    monkeypatch.setattr(sm_models.HyperParameterTuningJob, "__init__", tuning_init)

    requests: list[tuple[str, dict]] = []
    real_session = sm_estimator.session

    def capturing_session(settings):
        session = real_session(settings)

        def capture(params, model, **_):
            requests.append((model.name, json.loads(json.dumps(params, default=str))))

        session.sagemaker_client.meta.events.register("provide-client-params.sagemaker", capture)
        return session

    monkeypatch.setattr(sm_estimator, "session", capturing_session)

    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)

        class Box:
            def __init__(self):
                self.requests, self.telemetry = requests, telemetry_calls

            def calls(self, operation):
                return [params for name, params in requests if name == operation]

            def last(self, operation):
                found = self.calls(operation)
                assert found, f"no {operation} request was made"
                return found[-1]

        yield Box()


def record_channels(settings):
    """Channels as `bincount upload` records them, with a manifest in the mocked bucket."""
    import boto3

    from bincount.workspace import Workspace

    s3 = boto3.client("s3", region_name="us-east-1")
    channels = {}
    for split in ("train", "val", "test"):
        s3.put_object(Bucket=BUCKET, Key=f"bincount/{split}/manifest.jsonl", Body=b'{"count": 1, "image": "images/00001.jpg"}\n')
        channels[split] = f"s3://{BUCKET}/bincount/{split}/"
    Workspace(settings.workdir).update_state(channels=channels)


def finished_job_has_rule_findings(monkeypatch):
    """moto's jobs have no rule statuses and write no profiler report: give the finished job both."""
    import boto3
    from moto.sagemaker import models as sm_models

    real_init = sm_models.FakeTrainingJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.debug_rule_evaluation_statuses = [
            {"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "NoIssuesFound"},
            {"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "IssuesFound",
             "StatusDetails": "loss flat for 10 steps"}]
        self.profiler_rule_evaluation_statuses = [
            {"RuleConfigurationName": "ProfilerReport", "RuleEvaluationStatus": "NoIssuesFound"}]
        key = f"bincount/output/{self.training_job_name}/rule-output/ProfilerReport/profiler-output/profiler-report.html"
        boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=b"<html>report</html>")

    monkeypatch.setattr(sm_models.FakeTrainingJob, "__init__", init)


def test_training_request_has_rules_profiler_metrics_and_hyperparameters(sm, tmp_path, cli, monkeypatch):
    from types import SimpleNamespace

    from bincount.container.epochlog import METRIC_DEFINITIONS
    from bincount.workspace import Workspace

    record_channels(make_settings(tmp_path))
    finished_job_has_rule_findings(monkeypatch)
    out = cli("train", "--backend", "sagemaker", "--workdir", tmp_path, "--epochs", "1", "--image-size", "32",
              "--set", f"s3.bucket={BUCKET}", "--set", f"sagemaker.role={ROLE}", "--set", "sagemaker.tags={team: vision}",
              "--json")
    assert out.exit_code == 0, out.stderr
    result = SimpleNamespace(**json.loads(out.stdout))  # stdout holds the result alone: SDK output went to stderr

    req = sm.last("CreateTrainingJob")
    assert result.job == req["TrainingJobName"] and result.status == "Completed"
    rules = {r["RuleConfigurationName"]: r for r in req["DebugRuleConfigurations"]}
    assert set(rules) == {"VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"}
    assert all("RuleEvaluatorImage" in r for r in rules.values())
    collections = {c["CollectionName"]: c.get("CollectionParameters") for c in req["DebugHookConfig"]["CollectionConfigurations"]}
    assert set(collections) == {"gradients", "losses", "relu_input"}  # one entry each, no conflicting duplicates
    assert len(req["DebugHookConfig"]["CollectionConfigurations"]) == 3
    assert req["DebugHookConfig"]["S3OutputPath"].startswith(f"s3://{BUCKET}/bincount/output")
    assert [r["RuleConfigurationName"] for r in req["ProfilerRuleConfigurations"]] == ["ProfilerReport"]
    profiler = req["ProfilerConfig"]
    assert profiler["ProfilingIntervalInMilliseconds"] == 500 and "ProfilingParameters" not in profiler
    assert req["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert "pytorch-training:2.8.0-gpu-py312" in req["AlgorithmSpecification"]["TrainingImage"]
    hp = req["HyperParameters"]
    assert hp["sagemaker_program"] == '"train.py"' and hp["epochs"] == "1" and hp["arch"] == '"resnet18"'
    assert hp["num_classes"] == "6" and hp["image_size"] == "32"
    assert req["RoleArn"] == ROLE and req["OutputDataConfig"]["S3OutputPath"] == f"s3://{BUCKET}/bincount/output"
    assert {c["ChannelName"] for c in req["InputDataConfig"]} == {"train", "val", "test"}
    assert req["ResourceConfig"] == {"InstanceType": "ml.g4dn.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30}
    assert {"Key": "team", "Value": "vision"} in req["Tags"]
    assert "EnableManagedSpotTraining" not in req and "sagemaker_torch_distributed_enabled" not in hp

    assert {"rule": "LossNotDecreasing", "status": "IssuesFound", "detail": "loss flat for 10 steps",
            "source": "SageMaker"} in result.rules
    assert len(result.rules) == 3 and "LossNotDecreasing: IssuesFound" in out.stderr.replace("rule ", "").replace("[", "")
    report = Path(result.profiler_report) / "ProfilerReport" / "profiler-output" / "profiler-report.html"
    assert report.read_bytes() == b"<html>report</html>" and str(tmp_path / "reports") in str(report)

    state = Workspace(tmp_path).state().training
    assert isinstance(state, SageMakerTraining) and state.job == result.job
    assert state.model_data == f"s3://{BUCKET}/bincount/output/{result.job}/output/model.tar.gz"
    assert sm.telemetry == []  # the SDK's telemetry is opted out


def test_spot_distribution_rule_switches_and_actions(sm, tmp_path):
    from bincount.backends import sagemaker as backend

    settings = make_settings(tmp_path, **{
        "sagemaker.instance_count": 2, "sagemaker.use_spot_instances": True, "sagemaker.max_wait_s": 100000,
        "sagemaker.rules.overfit": False, "sagemaker.rules.vanishing_gradient": False,
        "sagemaker.rules.poor_weight_initialization": False, "sagemaker.rules.profiler_report": False,
        "sagemaker.rules.stop_training_on_failure": True, "sagemaker.subnets": ["subnet-1"],
        "sagemaker.security_group_ids": ["sg-1"], "sagemaker.volume_kms_key": "key-1", "train.wait": False})
    record_channels(settings)
    result = backend.train(settings)
    assert result.status == "InProgress"

    req = sm.last("CreateTrainingJob")
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 100000}
    assert req["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/bincount/checkpoints"
    assert req["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert req["ResourceConfig"]["InstanceCount"] == 2 and req["ResourceConfig"]["VolumeKmsKeyId"] == "key-1"
    assert req["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
    rules = req["DebugRuleConfigurations"]
    assert [r["RuleConfigurationName"] for r in rules] == ["Overtraining", "LossNotDecreasing"]
    assert all('"stoptraining"' in r["RuleParameters"]["action_json"].replace("\\", "") for r in rules)
    assert "ProfilerRuleConfigurations" not in req
    assert [c["CollectionName"] for c in req["DebugHookConfig"]["CollectionConfigurations"]] == ["losses"]


def test_clear_errors_without_role_channels_or_yes(tmp_path, cli):
    from bincount.backends import sagemaker as backend
    from bincount.workspace import Workspace

    with pytest.raises(BincountError, match="run bincount upload first"):
        backend.train(make_settings(tmp_path))
    Workspace(tmp_path).update_state(channels={"train": f"s3://{BUCKET}/bincount/train/"})
    with pytest.raises(BincountError, match="no S3 val channel"):
        backend.train(make_settings(tmp_path))
    Workspace(tmp_path).update_state(channels={"train": f"s3://{BUCKET}/bincount/train/",
                                               "val": f"s3://{BUCKET}/bincount/val/"})
    with pytest.raises(BincountError, match="set sagemaker.role"):
        backend.train(load_settings(overrides={"workdir": tmp_path, "s3.bucket": BUCKET}, environ={}))
    with pytest.raises(BincountError, match="role ARN"):
        load_settings(overrides={"sagemaker.role": "SageMakerRole"}, environ={})
    with pytest.raises(BincountError, match="no best hyperparameters"):
        backend.train(make_settings(tmp_path, **{"train.use_best": True}))

    Workspace(tmp_path).update_state(endpoint=SageMakerEndpoint(name="ep-1", mode="realtime", model_data="s3://b/m.tar.gz"))
    out = cli("undeploy", "--backend", "sagemaker", "--workdir", tmp_path)
    assert out.exit_code == 1 and "--yes" in out.stderr
    assert Workspace(tmp_path).state().endpoint.name == "ep-1"


def _local_model(workdir: Path, synth_source: Path) -> Path:
    """A real model.tar.gz: the real train.py run locally (1 epoch, 32 px) on synthetic bins, then packaged."""
    from bincount.artifacts import package_model
    from bincount.backends.local_train import make_channels, run_script
    from bincount.data.fetch import fetch
    from bincount.data.split import split

    settings = load_settings(overrides={
        "workdir": workdir, "data.source": str(synth_source), "data.limit": 36, "train.epochs": 1,
        "train.image_size": 32, "train.batch_size": 16, "train.arch": "mobilenet_v3_small", "train.num_workers": 0},
        environ={})
    fetch(settings)
    split(settings)
    out = run_script(settings.train.hyperparameters(settings.data.max_count), workdir / "models" / "run",
                     make_channels(settings))
    return package_model(out["model_dir"], workdir / "models" / "model.tar.gz")


@pytest.mark.slow
def test_whole_chain_tune_train_deploy_predict_undeploy(sm, tmp_path, synth_source, cli):
    import boto3

    from bincount.artifacts import extract_model
    from bincount.backends import sagemaker as backend
    from bincount.container import inference
    from bincount.data.upload import upload
    from bincount.workspace import Workspace

    ws = Workspace(tmp_path)
    tar = _local_model(tmp_path, synth_source)
    settings = make_settings(tmp_path)
    assert upload(settings).channels["train"].startswith(f"s3://{BUCKET}/bincount/train")

    # tune: the tuning request, the degraded trial table, the best trial recorded
    first = backend.tune(settings)
    req = sm.last("CreateHyperParameterTuningJob")
    config = req["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "val_acc"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    ranges = config["ParameterRanges"]
    assert {r["Name"]: r["ScalingType"] for r in ranges["ContinuousParameterRanges"]} == {
        "lr": "Logarithmic", "weight_decay": "Logarithmic"}
    assert [json.loads(v) for v in ranges["CategoricalParameterRanges"][0]["Values"]] == ["32", "64", "128", "256", "512"]
    definition = req["TrainingJobDefinition"]
    assert {"lr", "weight_decay", "batch_size"}.isdisjoint(definition["StaticHyperParameters"])
    assert definition["StaticHyperParameters"]["epochs"] == "1"
    assert {m["Name"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]} >= {"val_acc", "val_rmse"}
    assert "WarmStartConfig" not in req
    assert first.best_hyperparameters == {"lr": 0.0123, "weight_decay": 0.0002, "batch_size": 16}
    assert first.best_value == 0.75 and first.note and "unavailable" in first.note
    assert ws.state().tuning.best_hyperparameters["batch_size"] == 16

    second = backend.tune(settings)  # warm start from the first
    warm = sm.last("CreateHyperParameterTuningJob")["WarmStartConfig"]
    assert warm == {"ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": first.job}],
                    "WarmStartType": "IdenticalDataAndAlgorithm"}
    assert ws.state().tuning.job == second.job

    # train --use-best: the best hyperparameters reach the job (typed, internal keys gone)
    trained = backend.train(make_settings(tmp_path, **{"train.use_best": True}))
    hp = sm.last("CreateTrainingJob")["HyperParameters"]
    assert hp["lr"] == "0.0123" and hp["batch_size"] == "16" and "_tuning_objective_metric" not in hp

    # the job's artifact: the real model.tar.gz from the local training, where the job says it is
    bucket, key = trained.model_data[5:].split("/", 1)
    boto3.client("s3", region_name="us-east-1").upload_file(str(tar), bucket, key)

    # deploy realtime, then serverless under another name
    endpoint = backend.deploy(settings)
    assert endpoint.status == "InService"
    cfg = sm.last("CreateEndpointConfig")
    assert cfg["ProductionVariants"][0]["InstanceType"] == "ml.m5.large"
    assert cfg["ProductionVariants"][0]["InitialInstanceCount"] == 1
    model_req = sm.last("CreateModel")
    container = model_req.get("PrimaryContainer") or model_req["Containers"][0]
    assert "pytorch-inference:2.6.0-cpu-py312" in container["Image"]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    # the repacked artifact serves itself with the serving code only: no train.py, no smdebug to install
    import io
    import tarfile

    repacked = container["ModelDataUrl"][5:].split("/", 1)
    body = boto3.client("s3", region_name="us-east-1").get_object(Bucket=repacked[0], Key=repacked[1])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as served:
        names = set(served.getnames())
        requirements = served.extractfile("code/requirements.txt").read().decode()
    assert {"model.pth", "meta.json", "code/inference.py", "code/net.py", "code/epochlog.py"} <= names
    assert "code/train.py" not in names and "smdebug" not in requirements
    assert ws.state().endpoint.name == endpoint.endpoint

    serverless = backend.deploy(make_settings(tmp_path, **{"deploy.mode": "serverless", "deploy.endpoint_name": "bincount-sls"}))
    variant = sm.last("CreateEndpointConfig")["ProductionVariants"][0]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 5}
    assert "InstanceType" not in variant and serverless.mode == "serverless"

    # predict: seed moto with what the real handlers answer for this image, then ask through the CLI
    image = next((tmp_path / "raw" / "bin-images").glob("*.jpg"))
    bundle = inference.model_fn(str(extract_model(tar, tmp_path / "unpacked")))
    answer = inference.output_fn(inference.predict_fn(inference.input_fn(image.read_bytes(), "image/jpeg"), bundle))
    boto3.client("s3", region_name="us-east-1")  # keep moto's responses mock active for the seed below
    import requests

    requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                  json={"results": [{"Body": answer, "ContentType": "application/json"}]}, timeout=5)
    got = backend.invoke_endpoint(settings, "bincount-sls", image.read_bytes(), "image/jpeg")
    assert got == json.loads(answer)
    out = cli("predict", str(image), "--backend", "sagemaker", "--endpoint", "bincount-sls", "--workdir", tmp_path, "--json")
    assert out.exit_code == 0, out.stderr
    assert str(json.loads(answer)["count"]) in out.stdout

    # status describes the recorded jobs and endpoint
    status = cli("status", "--backend", "sagemaker", "--workdir", tmp_path, "--json")
    shown = json.loads(status.stdout)
    assert shown["training"]["status"] == "Completed" and shown["endpoint"]["status"] == "InService"
    assert shown["tuning"]["status"] == "Completed" and shown["data"]["train"] > 0

    # undeploy: endpoint, config and model gone; the recorded endpoint (the last deployed) forgotten
    realtime = backend.undeploy(make_settings(tmp_path, **{"deploy.endpoint_name": endpoint.endpoint}), yes=True)
    assert realtime.deleted == [f"endpoint {endpoint.endpoint}", f"endpoint config {endpoint.config_name}",
                                f"model {endpoint.model_name}"]
    assert ws.state().endpoint.name == "bincount-sls"
    gone = backend.undeploy(settings, yes=True)
    assert gone.endpoint == "bincount-sls" and len(gone.deleted) == 3
    client = boto3.client("sagemaker", region_name="us-east-1")
    assert client.list_endpoints()["Endpoints"] == [] and client.list_models()["Models"] == []
    assert client.list_endpoint_configs()["EndpointConfigs"] == []
    assert ws.state().endpoint is None
    assert sm.telemetry == []


def test_invoke_endpoint_rejects_non_json(sm, tmp_path):
    import requests

    from bincount.backends import sagemaker as backend

    requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                  json={"results": [{"Body": "<html>oops</html>", "ContentType": "text/html"}]}, timeout=5)
    with pytest.raises(BincountError, match="not JSON"):
        backend.invoke_endpoint(make_settings(tmp_path), "ep", base64.b64decode("/9j/"), "image/jpeg")
