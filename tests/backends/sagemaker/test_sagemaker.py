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
from bincount.workspace import Workspace

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
def sm(monkeypatch, captured_sagemaker_requests):
    """moto's SageMaker/S3 (in-process), a bucket, captured SageMaker requests, no way out to the network."""
    from bincount.backends.sagemaker import jobs

    jobs.load_sdk()
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

    requests = captured_sagemaker_requests

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


def put_model_tar(key: str, meta: bytes = b"{}") -> str:
    """A model.tar.gz holding one meta.json, put in the test bucket at `key` (what the SDK repacks); its S3 URI."""
    import io
    import tarfile

    import boto3

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("meta.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())
    return f"s3://{BUCKET}/{key}"


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
    assert "EnableManagedSpotTraining" not in req
    # a GPU instance trains under torch_distributed: one process per GPU it has (one here)
    assert hp["sagemaker_torch_distributed_enabled"] == "true"

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
    from bincount.backends.sagemaker import training

    settings = make_settings(tmp_path, **{
        "sagemaker.instance_count": 2, "sagemaker.use_spot_instances": True, "sagemaker.max_wait_s": 100000,
        "sagemaker.rules.overfit": False, "sagemaker.rules.vanishing_gradient": False,
        "sagemaker.rules.poor_weight_initialization": False, "sagemaker.rules.profiler_report": False,
        "sagemaker.rules.stop_training_on_failure": True, "sagemaker.subnets": ["subnet-1"],
        "sagemaker.security_group_ids": ["sg-1"], "sagemaker.volume_kms_key": "key-1", "train.wait": False})
    record_channels(settings)
    result = training.train(settings)
    assert result.status == "InProgress"

    req = sm.last("CreateTrainingJob")
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 100000}
    assert req["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/bincount/checkpoints/{req['TrainingJobName']}/"
    assert req["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    assert req["ResourceConfig"]["InstanceCount"] == 2 and req["ResourceConfig"]["VolumeKmsKeyId"] == "key-1"
    assert req["VpcConfig"] == {"Subnets": ["subnet-1"], "SecurityGroupIds": ["sg-1"]}
    rules = req["DebugRuleConfigurations"]
    assert [r["RuleConfigurationName"] for r in rules] == ["Overtraining", "LossNotDecreasing"]
    assert all('"stoptraining"' in r["RuleParameters"]["action_json"].replace("\\", "") for r in rules)
    assert "ProfilerRuleConfigurations" not in req
    assert [c["CollectionName"] for c in req["DebugHookConfig"]["CollectionConfigurations"]] == ["losses"]


def test_clear_errors_without_role_channels_or_yes(tmp_path, cli):
    from bincount.backends.sagemaker import training
    from bincount.workspace import Workspace

    with pytest.raises(BincountError, match="run bincount upload first"):
        training.train(make_settings(tmp_path))
    Workspace(tmp_path).update_state(channels={"train": f"s3://{BUCKET}/bincount/train/"})
    with pytest.raises(BincountError, match="no S3 val channel"):
        training.train(make_settings(tmp_path))
    Workspace(tmp_path).update_state(channels={"train": f"s3://{BUCKET}/bincount/train/",
                                               "val": f"s3://{BUCKET}/bincount/val/"})
    with pytest.raises(BincountError, match="set sagemaker.role"):
        training.train(load_settings(overrides={"workdir": tmp_path, "s3.bucket": BUCKET}, environ={}))
    with pytest.raises(BincountError, match="role ARN"):
        load_settings(overrides={"sagemaker.role": "SageMakerRole"}, environ={})
    with pytest.raises(BincountError, match="no best hyperparameters"):
        training.train(make_settings(tmp_path, **{"train.use_best": True}))

    Workspace(tmp_path).update_state(endpoint=SageMakerEndpoint(name="ep-1", mode="realtime", model_data="s3://b/m.tar.gz"))
    out = cli("undeploy", "--backend", "sagemaker", "--workdir", tmp_path)
    assert out.exit_code == 1 and "--yes" in out.stderr
    assert Workspace(tmp_path).state().endpoint.name == "ep-1"


def _local_model(workdir: Path, synth_source: Path) -> Path:
    """A real model.tar.gz: the real train.py run locally (1 epoch, 32 px) on synthetic bins, then packaged."""
    from bincount.artifacts import package_model
    from bincount.backends.local.train import make_channels, run_script
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
    from bincount.aws import Aws
    from bincount.backends.sagemaker import endpoint as sm_endpoint, runtime, training, tuning
    from bincount.container import inference
    from bincount.data.upload import upload
    from bincount.workspace import Workspace

    ws = Workspace(tmp_path)
    tar = _local_model(tmp_path, synth_source)
    settings = make_settings(tmp_path)
    assert upload(settings).channels["train"].startswith(f"s3://{BUCKET}/bincount/train")

    # tune: the tuning request, the degraded trial table, the best trial recorded
    first = tuning.tune(settings)
    req = sm.last("CreateHyperParameterTuningJob")
    config = req["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "val_acc"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    ranges = config["ParameterRanges"]
    assert {r["Name"]: r["ScalingType"] for r in ranges["ContinuousParameterRanges"]} == {
        "lr": "Logarithmic", "weight_decay": "Logarithmic"}
    # ~21 train images: no batch size of the default choices gives 4 steps an epoch, so the smallest alone (issue 23.5)
    assert [json.loads(v) for v in ranges["CategoricalParameterRanges"][0]["Values"]] == ["32"]
    definition = req["TrainingJobDefinition"]
    assert {"lr", "weight_decay", "batch_size"}.isdisjoint(definition["StaticHyperParameters"])
    assert definition["StaticHyperParameters"]["epochs"] == "1"
    assert {m["Name"] for m in definition["AlgorithmSpecification"]["MetricDefinitions"]} >= {"val_acc", "val_rmse"}
    assert "WarmStartConfig" not in req
    assert first.best_hyperparameters == {"lr": 0.0123, "weight_decay": 0.0002, "batch_size": 16}
    assert first.best_value == 0.75 and first.note and "unavailable" in first.note
    assert ws.state().tuning.best_hyperparameters["batch_size"] == 16

    second = tuning.tune(settings)  # warm start from the first
    warm = sm.last("CreateHyperParameterTuningJob")["WarmStartConfig"]
    assert warm == {"ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": first.job}],
                    "WarmStartType": "IdenticalDataAndAlgorithm"}
    assert ws.state().tuning.job == second.job

    # train --use-best: the best hyperparameters reach the job (typed, internal keys gone)
    trained = training.train(make_settings(tmp_path, **{"train.use_best": True}))
    hp = sm.last("CreateTrainingJob")["HyperParameters"]
    assert hp["lr"] == "0.0123" and hp["batch_size"] == "16" and "_tuning_objective_metric" not in hp

    # the job's artifact: the real model.tar.gz from the local training, where the job says it is
    bucket, key = trained.model_data[5:].split("/", 1)
    boto3.client("s3", region_name="us-east-1").upload_file(str(tar), bucket, key)

    # deploy realtime, then serverless under another name
    endpoint = sm_endpoint.deploy(settings)
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

    serverless = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.mode": "serverless", "deploy.endpoint_name": "bincount-sls"}))
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
    got = runtime.invoke_endpoint(Aws(settings), "bincount-sls", image.read_bytes(), "image/jpeg")
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
    realtime = sm_endpoint.undeploy(make_settings(tmp_path, **{"deploy.endpoint_name": endpoint.endpoint}), yes=True)
    assert realtime.deleted == [f"endpoint {endpoint.endpoint}", f"endpoint config {endpoint.config_name}",
                                f"model {endpoint.model_name}"]
    assert ws.state().endpoint.name == "bincount-sls"
    gone = sm_endpoint.undeploy(settings, yes=True)
    assert gone.endpoint == "bincount-sls" and len(gone.deleted) == 3
    client = boto3.client("sagemaker", region_name="us-east-1")
    assert client.list_endpoints()["Endpoints"] == [] and client.list_models()["Models"] == []
    assert client.list_endpoint_configs()["EndpointConfigs"] == []
    assert ws.state().endpoint is None
    assert sm.telemetry == []


def test_invoke_endpoint_rejects_non_json(sm, tmp_path):
    import requests

    from bincount.aws import Aws
    from bincount.backends.sagemaker import runtime

    requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                  json={"results": [{"Body": "<html>oops</html>", "ContentType": "text/html"}]}, timeout=5)
    with pytest.raises(BincountError, match="not JSON"):
        runtime.invoke_endpoint(Aws(make_settings(tmp_path)), "ep", base64.b64decode("/9j/"), "image/jpeg")


# -- the control side of issue 14: requests SageMaker would reject, waits, stops, tags, regions -------------

def test_gpu_instance_families():
    from bincount.backends.sagemaker.estimator import is_gpu_instance

    gpu = ["ml.g4dn.xlarge", "ml.g5.12xlarge", "ml.g6e.2xlarge", "ml.p3.2xlarge", "ml.p4d.24xlarge", "ml.p5.48xlarge"]
    other = ["ml.m5.xlarge", "ml.c5.2xlarge", "ml.trn1.32xlarge", "ml.inf2.xlarge", "ml.r5.large", "ml.t3.medium"]
    assert all(is_gpu_instance(t) for t in gpu) and not any(is_gpu_instance(t) for t in other)


def test_ddp_on_a_cpu_instance_is_refused_before_any_request(sm, tmp_path, cli):
    settings = make_settings(tmp_path)
    record_channels(settings)
    # ml.trn1 passes the SDK's own torch_distributed check (Neuron), but train.py uses CUDA or the CPU
    for instance_type in ("ml.m5.xlarge", "ml.trn1.32xlarge"):
        out = cli("train", "--backend", "sagemaker", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}",
                  "--set", f"sagemaker.role={ROLE}", "--set", "sagemaker.instance_count=2",
                  "--set", f"sagemaker.instance_type={instance_type}")
        assert out.exit_code == 1 and "Traceback" not in out.stderr
        assert "sagemaker.instance_count=2 runs torch_distributed" in out.stderr and instance_type in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert sm.calls("CreateTrainingJob") == []


def test_hyperband_request_and_grid_refused(sm, tmp_path):
    from bincount.backends.sagemaker import tuning

    settings = make_settings(tmp_path, **{"tune.strategy": "Hyperband", "tune.epochs": 12, "train.warmup_epochs": 2,
                                          "tune.wait": False, "sagemaker.tags": {"team": "vision"}})
    record_channels(settings)
    first = tuning.tune(settings)
    second = tuning.tune(settings)  # a Hyperband job takes no warm start
    req = sm.last("CreateHyperParameterTuningJob")
    config = req["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Hyperband" and config["TrainingJobEarlyStoppingType"] == "Off"
    assert config["StrategyConfig"] == {"HyperbandStrategyConfig": {"MinResource": 3, "MaxResource": 12}}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    assert req["TrainingJobDefinition"]["StaticHyperParameters"]["epochs"] == "12"
    assert "WarmStartConfig" not in req and first.job != second.job
    assert {"Key": "team", "Value": "vision"} in req["Tags"]

    for strategy in ("Bayesian", "Random"):  # no StrategyConfig outside Hyperband
        tuning.tune(make_settings(tmp_path, **{"tune.strategy": strategy, "tune.warm_start": False, "tune.wait": False}))
        config = sm.last("CreateHyperParameterTuningJob")["HyperParameterTuningJobConfig"]
        assert config["Strategy"] == strategy and "StrategyConfig" not in config
        assert config["TrainingJobEarlyStoppingType"] == "Auto"
    count = len(sm.calls("CreateHyperParameterTuningJob"))
    with pytest.raises(BincountError, match="Grid.*categorical"):
        tuning.tune(make_settings(tmp_path, **{"tune.strategy": "Grid"}))
    assert len(sm.calls("CreateHyperParameterTuningJob")) == count


def test_warm_start_only_from_an_ended_parent(sm, tmp_path, monkeypatch):
    from moto.sagemaker import models as sm_models

    from bincount.backends.sagemaker import tuning

    settings = make_settings(tmp_path, **{"tune.wait": False})
    record_channels(settings)
    status = {"value": "InProgress"}
    real_init = sm_models.HyperParameterTuningJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.hyper_parameter_tuning_job_status = status["value"]

    monkeypatch.setattr(sm_models.HyperParameterTuningJob, "__init__", init)
    first = tuning.tune(settings)
    tuning.tune(settings)  # the first still runs: no parent
    assert "WarmStartConfig" not in sm.last("CreateHyperParameterTuningJob")

    status["value"] = "Stopped"
    parent = tuning.tune(settings)
    assert parent.job != first.job
    tuning.tune(settings)  # the recorded one (parent) has stopped: it is the parent
    warm = sm.last("CreateHyperParameterTuningJob")["WarmStartConfig"]
    assert warm["ParentHyperParameterTuningJobs"] == [{"HyperParameterTuningJobName": parent.job}]


def _rules_finish_later(monkeypatch, polls_needed: int):
    """moto's jobs end at once; here their rule evaluations run on for `polls_needed` polls, then write the report."""
    import boto3
    from moto.sagemaker import models as sm_models

    from bincount.backends.sagemaker import debugger

    jobs = []
    real_init = sm_models.FakeTrainingJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.debug_rule_evaluation_statuses = [{"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "InProgress"}]
        self.profiler_rule_evaluation_statuses = [
            {"RuleConfigurationName": "ProfilerReport", "RuleEvaluationStatus": "InProgress"}]
        jobs.append(self)

    def finish(job):
        job.debug_rule_evaluation_statuses = [{"RuleConfigurationName": "Overfit", "RuleEvaluationStatus": "IssuesFound",
                                               "StatusDetails": "val loss rising"}]
        job.profiler_rule_evaluation_statuses = [
            {"RuleConfigurationName": "ProfilerReport", "RuleEvaluationStatus": "NoIssuesFound"}]
        key = f"bincount/output/{job.training_job_name}/rule-output/ProfilerReport/profiler-output/profiler-report.html"
        boto3.client("s3", region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=b"<html>late</html>")

    sleeps = []

    class Clock:
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(seconds):
            sleeps.append(seconds)
            if len(sleeps) == polls_needed:
                finish(jobs[-1])

    monkeypatch.setattr(sm_models.FakeTrainingJob, "__init__", init)
    monkeypatch.setattr(debugger, "time", Clock())
    return jobs, finish, sleeps


def test_rule_evaluations_are_waited_for_then_the_report_fetched(sm, tmp_path, monkeypatch):
    from bincount.backends.sagemaker import training
    from bincount.workspace import Workspace

    settings = make_settings(tmp_path)
    record_channels(settings)
    _, _, sleeps = _rules_finish_later(monkeypatch, polls_needed=2)
    result = training.train(settings)
    assert len(sleeps) == 2  # polled until the rules ended
    assert {"rule": "Overfit", "status": "IssuesFound", "detail": "val loss rising", "source": "SageMaker"} in result.rules
    report = Path(result.profiler_report) / "ProfilerReport" / "profiler-output" / "profiler-report.html"
    assert report.read_bytes() == b"<html>late</html>"
    recorded = Workspace(tmp_path).state().training
    assert recorded.rules == {"Overfit": "IssuesFound", "ProfilerReport": "NoIssuesFound"}
    assert recorded.profiler_report == result.profiler_report


def test_rules_unfinished_after_the_bound_show_in_status_later(sm, tmp_path, monkeypatch, cli):
    from bincount.backends.sagemaker import training

    settings = make_settings(tmp_path, **{"sagemaker.rules.wait_s": 0})
    record_channels(settings)
    jobs, finish, sleeps = _rules_finish_later(monkeypatch, polls_needed=10**6)
    result = training.train(settings)
    assert sleeps == [] and result.profiler_report is None
    assert {r["status"] for r in result.rules} == {"InProgress"}

    finish(jobs[-1])  # the evaluations end after bincount train returned
    out = cli("status", "--backend", "sagemaker", "--workdir", tmp_path, "--json")
    training = json.loads(out.stdout)["training"]
    assert training["rules"] == {"Overfit": "IssuesFound", "ProfilerReport": "NoIssuesFound"}
    report = Path(training["profiler_report"]) / "ProfilerReport" / "profiler-output" / "profiler-report.html"
    assert report.read_bytes() == b"<html>late</html>" and str(tmp_path / "reports" / "profiler") in str(report)


def _stop_requests(monkeypatch, sm_box):
    """moto has no StopTrainingJob / StopHyperParameterTuningJob: answer them as SageMaker does (an empty
    response), record the request, and mark the moto job Stopping."""
    from moto.sagemaker import models as sm_models

    stops = []

    def handler(model, params, **_):
        params = json.loads(params["body"])  # the serialized request
        stops.append((model.name, params))
        for backend in sm_models.sagemaker_backends.values():
            for region in backend.values():
                for job in region.training_jobs.values():
                    if job.training_job_name == params.get("TrainingJobName"):
                        job.training_job_status = "Stopping"
        from botocore.awsrequest import AWSResponse

        return AWSResponse("https://api.sagemaker", 200, {}, None), {"ResponseMetadata": {"HTTPStatusCode": 200}}

    import botocore.session

    real_create = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = real_create(self, *args, **kwargs)
        if client.meta.service_model.service_name == "sagemaker":
            for op in ("StopTrainingJob", "StopHyperParameterTuningJob"):
                client.meta.events.register(f"before-call.sagemaker.{op}", handler)
        return client

    monkeypatch.setattr(botocore.session.Session, "create_client", create_client)
    return stops


def _training_running(monkeypatch):
    from moto.sagemaker import models as sm_models

    real_init = sm_models.FakeTrainingJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.training_job_status = "InProgress"

    monkeypatch.setattr(sm_models.FakeTrainingJob, "__init__", init)


def test_ctrl_c_during_a_waited_train_offers_to_stop_the_job(sm, tmp_path, monkeypatch, cli):
    import sagemaker.estimator
    import typer

    from bincount.backends.sagemaker import jobs, training

    settings = make_settings(tmp_path)
    record_channels(settings)
    _training_running(monkeypatch)
    stops = _stop_requests(monkeypatch, sm)

    def interrupted(self, logs="All"):
        raise KeyboardInterrupt

    monkeypatch.setattr(sagemaker.estimator._TrainingJob, "wait", interrupted)
    # no terminal: nothing is stopped, and the message says exactly how to stop the job
    out = cli("train", "--backend", "sagemaker", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}",
              "--set", f"sagemaker.role={ROLE}")
    job = sm.last("CreateTrainingJob")["TrainingJobName"]
    assert out.exit_code == 130 and stops == []
    assert f"bincount stop --job {job}" in out.stderr and "billing" in out.stderr and "resume" not in out.stderr

    # at a terminal: asked, and a yes stops it
    monkeypatch.setattr(jobs.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(jobs.sys.stderr, "isatty", lambda: True, raising=False)
    asked = []
    monkeypatch.setattr(typer, "confirm", lambda question, **kw: asked.append(question) or True)
    with pytest.raises(KeyboardInterrupt, match="stopping training job"):
        training.train(settings)
    job = sm.last("CreateTrainingJob")["TrainingJobName"]
    assert stops == [("StopTrainingJob", {"TrainingJobName": job})] and job in asked[0]


def test_stop_command_stops_a_no_wait_job(sm, tmp_path, monkeypatch, cli):
    from bincount.backends.sagemaker import training

    settings = make_settings(tmp_path, **{"train.wait": False})
    record_channels(settings)
    _training_running(monkeypatch)
    stops = _stop_requests(monkeypatch, sm)
    job = training.train(settings).job

    base = ("--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}")
    out = cli("stop", *base)  # not a terminal and no --yes: refuses, stops nothing
    assert out.exit_code == 1 and "--yes" in out.stderr and stops == []
    out = cli("stop", *base, "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["stopped"] == [f"training job {job}"]
    assert stops == [("StopTrainingJob", {"TrainingJobName": job})]
    out = cli("stop", *base, "--yes", "--json")  # now Stopping: nothing more to stop
    assert json.loads(out.stdout)["stopped"] == [] and len(stops) == 1
    out = cli("stop", *base, "--job", "no-such-job", "--yes")
    assert out.exit_code == 1 and "no SageMaker training, tuning, transform or processing job named no-such-job" in out.stderr


def test_tags_and_images_reach_model_endpoint_config_and_endpoint(sm, tmp_path):
    from bincount.backends.sagemaker import endpoint as sm_endpoint

    put_model_tar("m/model.tar.gz")
    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.7.1-cpu-py312-ubuntu22.04-sagemaker"
    settings = make_settings(tmp_path, **{"sagemaker.tags": {"team": "vision", "cost": "bins"},
                                          "deploy.model_data": f"s3://{BUCKET}/m/model.tar.gz", "deploy.image_uri": image})
    sm_endpoint.deploy(settings)
    tags = [{"Key": "team", "Value": "vision"}, {"Key": "cost", "Value": "bins"}]
    for operation in ("CreateModel", "CreateEndpointConfig", "CreateEndpoint"):
        assert all(t in sm.last(operation).get("Tags", []) for t in tags), operation
    model = sm.last("CreateModel")
    assert (model.get("PrimaryContainer") or model["Containers"][0])["Image"] == image

    for bad, message in (("pytorch-inference:2.7.1", "not an ECR image"),
                         (image.replace("us-east-1", "eu-west-1"), "in eu-west-1 but")):
        with pytest.raises(BincountError, match=message):
            sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/m/model.tar.gz",
                                                      "deploy.image_uri": bad}))


def test_training_image_uri_overrides_the_framework_version(sm, tmp_path):
    from bincount.backends.sagemaker import training

    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker"
    settings = make_settings(tmp_path, **{"sagemaker.image_uri": image, "train.wait": False})
    record_channels(settings)
    training.train(settings)
    assert sm.last("CreateTrainingJob")["AlgorithmSpecification"]["TrainingImage"] == image


def test_activation_inputs_regex_matches_each_architectures_activations():
    import re

    import torch.nn as nn

    from bincount.backends.sagemaker.debugger import activation_inputs_regex
    from bincount.config import TrainSettings
    from bincount.container.net import build_model

    for arch in TrainSettings.model_fields["arch"].annotation.__args__:
        regex = activation_inputs_regex(arch)
        model = build_model(arch, 6)
        # smdebug names a module's inputs "<name from named_modules()>_input_<i>" (the model train.py registers)
        matched = {name for name, _ in model.named_modules() if name and re.search(regex, f"{name}_input_0")}
        activations = {name for name, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.Hardswish))}
        assert matched and matched <= activations, arch
        main = {n for n in activations if not n.endswith(".activation")}  # all but the squeeze-excite gates' ReLU
        assert main <= matched, (arch, main - matched)
        assert not re.search(regex, "features.1.block.0.0_input_0") and not re.search(regex, "fc_input_0")


def test_poor_weight_initialization_reads_the_mobilenet_activations(sm, tmp_path):
    from bincount.backends.sagemaker import training
    from bincount.backends.sagemaker.debugger import activation_inputs_regex

    settings = make_settings(tmp_path, **{"train.arch": "mobilenet_v3_small", "train.wait": False})
    record_channels(settings)
    training.train(settings)
    req = sm.last("CreateTrainingJob")
    regex = activation_inputs_regex("mobilenet_v3_small")
    collections = {c["CollectionName"]: c["CollectionParameters"] for c in req["DebugHookConfig"]["CollectionConfigurations"]}
    assert collections["relu_input"]["include_regex"] == regex
    rule = next(r for r in req["DebugRuleConfigurations"] if r["RuleConfigurationName"] == "PoorWeightInitialization")
    assert rule["RuleParameters"]["activation_inputs_regex"] == regex


def test_region_precedence(monkeypatch, tmp_path):
    from bincount.aws import resolve_region

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config"
    config.write_text("[default]\nregion = ap-south-1\n[profile other]\nregion = sa-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert resolve_region() == "ap-south-1"
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert resolve_region() == "sa-east-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert resolve_region() == "eu-west-2"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert resolve_region() == "eu-central-1"
    assert resolve_region("us-west-2") == "us-west-2"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name)
    assert resolve_region() == "us-east-1"
    # the settings no longer pin a region over the environment
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    from bincount.aws import job_region as region

    assert region(load_settings(environ={})) == "eu-central-1"
    assert region(load_settings(overrides={"sagemaker.region": "us-west-2"}, environ={})) == "us-west-2"


def test_bucket_and_job_regions_must_agree(sm, tmp_path):
    import boto3

    from bincount.backends.sagemaker import training

    settings = make_settings(tmp_path)
    record_channels(settings)
    with pytest.raises(BincountError, match="s3.region=eu-west-1 but the SageMaker jobs run in us-east-1"):
        training.train(make_settings(tmp_path, **{"s3.region": "eu-west-1"}))
    boto3.client("s3", region_name="eu-west-1").create_bucket(
        Bucket="bincount-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(BincountError, match="bucket bincount-eu is in eu-west-1 but the SageMaker jobs run in us-east-1"):
        training.train(make_settings(tmp_path, **{"s3.bucket": "bincount-eu"}))
    assert sm.calls("CreateTrainingJob") == []


def test_cleanup_deletes_what_bincount_made_after_one_confirmation(sm, tmp_path, cli):
    import boto3

    from bincount.backends.sagemaker import endpoint as sm_endpoint, training
    from bincount.workspace import Workspace

    s3 = boto3.client("s3", region_name="us-east-1")
    put_model_tar("bincount/models/model.tar.gz")
    s3.put_object(Bucket=BUCKET, Key="someone-else/keep.txt", Body=b"not ours")
    settings = make_settings(tmp_path, **{"train.wait": False, "deploy.model_data": f"s3://{BUCKET}/bincount/models/model.tar.gz"})
    record_channels(settings)
    training.train(settings)
    first = sm_endpoint.deploy(settings)
    second = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/bincount/models/model.tar.gz",
                                                       "deploy.endpoint_name": "bincount-second"}))
    client = boto3.client("sagemaker", region_name="us-east-1")
    client.create_model(ModelName="other-model", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "x"})
    assert len(client.list_endpoints()["Endpoints"]) == 2
    from bincount.state import LocalTraining, SageMakerTraining, SageMakerTransform

    older = SageMakerTraining(job="bincount-older", status="Completed", model_data=f"s3://{BUCKET}/bincount/o/model.tar.gz")
    local = LocalTraining(job="local-run", model_data=str(tmp_path / "m.tar.gz"), model_dir=str(tmp_path / "m"))
    out_uri = f"s3://{BUCKET}/bincount/transform/job-1/"
    transform = SageMakerTransform(job="job-1", status="Completed", model_name=first.model_name,
                                   model_data=first.model_data, input_manifest=f"{out_uri}in.manifest",
                                   input_prefix=out_uri, input_key_prefix="bincount/transform/job-1/",
                                   output_path=out_uri, bins=1, bins_file=str(tmp_path / "bins.jsonl"), source="x",
                                   source_digest="d")
    Workspace(tmp_path).update_state(runs=[local, older], use="bincount-older", transform=transform)

    base = ("--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}")
    out = cli("cleanup", *base)  # no terminal and no --yes: nothing deleted
    assert out.exit_code == 1 and "--yes" in out.stderr and first.endpoint in out.stderr
    assert len(client.list_endpoints()["Endpoints"]) == 2

    out = cli("cleanup", *base, "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    assert {f"endpoint {first.endpoint}", f"endpoint {second.endpoint}", f"model {first.model_name}",
            f"endpoint config {first.config_name}"} <= set(result["deleted"])
    assert client.list_endpoints()["Endpoints"] == [] and client.list_endpoint_configs()["EndpointConfigs"] == []
    assert [m["ModelName"] for m in client.list_models()["Models"]] == ["other-model"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys == ["someone-else/keep.txt"] and result["s3_objects"] > 5
    state = Workspace(tmp_path).state()
    assert state.endpoint is None and state.channels == {} and state.training is None
    assert state.transform is None and state.use is None and state.runs == [local]  # the local run is not AWS's

    out = cli("cleanup", *base, "--yes", "--json")  # again: nothing left to do
    assert out.exit_code == 0 and json.loads(out.stdout)["deleted"] == []


def test_shard_processing_job_reads_the_public_bucket_and_training_streams_the_shards(sm, tmp_path, cli):
    """`bincount shard --backend sagemaker`: a Processing job runs container/shards.py bucket to bucket;
    the training job then gets the shard channels in FastFile mode."""
    import boto3

    from bincount.workspace import Workspace, write_jsonl

    ws = Workspace(tmp_path)
    for split, ids in {"train": range(1, 9), "val": range(9, 12), "test": range(12, 15)}.items():
        write_jsonl(ws.split(split), [{"id": f"{n:05d}", "count": n % 3, "skus": 1, "bytes": 100} for n in ids])
    out = cli("shard", "--backend", "sagemaker", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}",
              "--set", f"sagemaker.role={ROLE}", "--set", "shard.instance_count=2", "--set", "train.image_size=112",
              "--json")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    req = sm.last("CreateProcessingJob")
    assert result["job"] == req["ProcessingJobName"] and result["status"] == "Completed"
    app = req["AppSpecification"]
    assert "pytorch-training:2.8.0-cpu-py312" in app["ImageUri"]  # the training image: boto3, Pillow, python3
    assert app["ContainerEntrypoint"] == ["python3", "/opt/ml/processing/input/code/shards.py"]
    args = app["ContainerArguments"]
    assert args[args.index("--source") + 1] == "s3://aft-vbi-pds"
    assert args[args.index("--dest") + 1] == f"s3://{BUCKET}/bincount/shards"
    assert args[args.index("--max_side") + 1] == "224" and "--signed_source" not in args
    assert [a for a in args if a.endswith(".jsonl")] == [f"/opt/ml/processing/input/items/{s}.jsonl" for s in ("train", "val", "test")]
    inputs = {i["InputName"]: i["S3Input"] for i in req["ProcessingInputs"]}
    assert inputs["items"]["LocalPath"] == "/opt/ml/processing/input/items" and inputs["code"]["S3Uri"].endswith("shards.py")
    assert req["ProcessingResources"]["ClusterConfig"] == {"InstanceCount": 2, "InstanceType": "ml.m5.xlarge", "VolumeSizeInGB": 30}
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400} and req["RoleArn"] == ROLE
    # the job gets ids and counts only
    bucket, key = inputs["items"]["S3Uri"][5:].split("/", 1)
    body = boto3.client("s3", region_name="us-east-1").get_object(Bucket=bucket, Key=f"{key}/train.jsonl")["Body"].read()
    assert [json.loads(line) for line in body.decode().splitlines()][0] == {"id": "00001", "count": 1}
    state = ws.state()
    assert state.channel_format == "shards"
    assert state.channels == {s: f"s3://{BUCKET}/bincount/shards/{s}" for s in ("train", "val", "test")}

    out = cli("train", "--backend", "sagemaker", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}",
              "--set", f"sagemaker.role={ROLE}", "--no-wait", "--json")
    assert out.exit_code == 0, out.stderr
    channels = {c["ChannelName"]: c for c in sm.last("CreateTrainingJob")["InputDataConfig"]}
    assert {name: c["InputMode"] for name, c in channels.items()} == {"train": "FastFile", "val": "FastFile", "test": "FastFile"}
    assert channels["train"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://{BUCKET}/bincount/shards/train"


def test_shard_processing_job_needs_an_s3_source(sm, tmp_path, cli):
    from bincount.workspace import Workspace, write_jsonl

    for split in ("train", "val"):
        write_jsonl(Workspace(tmp_path).split(split), [{"id": "00001", "count": 1}])
    out = cli("shard", "--backend", "sagemaker", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}",
              "--set", f"sagemaker.role={ROLE}", "--set", f"data.source={tmp_path}")
    assert out.exit_code == 1 and "reads the images from S3" in out.stderr


def test_tuning_keeps_the_search_within_the_data_and_records_what_use_best_reproduces(sm, tmp_path, capsys):
    """Issue 23.5 on SageMaker: batch sizes capped by the train split (360 images: an epoch of at least 4 steps), the
    request within the API's rules (CategoricalParameterRange: 1-30 values of 1-256 characters); what the trials ran
    with (image_size, arch, epochs) recorded with the best, and train --use-best runs that way; a best trial near
    chance on val warns. A diverged trial fails in train.py (tests/container/test_loop.py), so it is never the best."""
    from bincount.backends.sagemaker import training, tuning
    from bincount.workspace import Workspace, write_jsonl

    ws = Workspace(tmp_path)
    write_jsonl(ws.split("train"), [{"id": str(i), "count": i % 6, "image": f"{i}.jpg"} for i in range(360)])
    write_jsonl(ws.split("val"), [{"id": f"v{i}", "count": 0 if i < 90 else 1, "image": f"v{i}.jpg"}
                                  for i in range(100)])  # 90% zeros: the best trial's val_acc 0.75 is below chance
    settings = make_settings(tmp_path, **{"train.image_size": 96, "train.arch": "resnet34", "tune.epochs": 3,
                                          "tune.batch_size": [32, 64, 128, 256, 512]})
    record_channels(settings)
    result = tuning.tune(settings)
    config = sm.last("CreateHyperParameterTuningJob")["HyperParameterTuningJobConfig"]
    [categorical] = config["ParameterRanges"]["CategoricalParameterRanges"]
    assert categorical["Name"] == "batch_size" and [json.loads(v) for v in categorical["Values"]] == ["32", "64"]
    assert 1 <= len(categorical["Values"]) <= 30 and all(1 <= len(v) <= 256 for v in categorical["Values"])
    err = capsys.readouterr().err
    assert "batch sizes 128, 256, 512 left out of the search: 360 train images" in err
    assert result.warning and "near chance (0.900" in result.warning and "near chance" in err
    recorded = ws.state().tuning
    assert recorded.hyperparameters["image_size"] == 96 and recorded.hyperparameters["arch"] == "resnet34"
    assert recorded.hyperparameters["epochs"] == 3 and "lr" not in recorded.hyperparameters

    mine = {"workdir": tmp_path, "backend": "sagemaker", "s3.bucket": BUCKET, "sagemaker.role": ROLE,
            "train.use_best": True, "train.wait": False}  # no train.image_size, arch or epochs of the user's
    training.train(load_settings(overrides=mine, environ={}))
    hp = sm.last("CreateTrainingJob")["HyperParameters"]
    assert (json.loads(hp["image_size"]), json.loads(hp["arch"]), json.loads(hp["epochs"])) == (96, "resnet34", 3)
    assert hp["lr"] == "0.0123" and hp["batch_size"] == "16"
    training.train(load_settings(overrides={**mine, "train.image_size": 64}, environ={}))  # the user's own wins
    assert json.loads(sm.last("CreateTrainingJob")["HyperParameters"]["image_size"]) == 64
    assert "your settings win over the trials' image_size=64 (trials: 96)" in capsys.readouterr().err


def test_stop_finds_a_running_job_behind_a_pinned_run(sm, tmp_path, monkeypatch, cli):
    """Issue 23.4: `runs --use` pins an older run while a newer job runs; stop, status and cleanup still find it."""
    from bincount.backends.sagemaker import training
    from bincount.workspace import Workspace

    settings = make_settings(tmp_path, **{"train.wait": False})
    record_channels(settings)
    _training_running(monkeypatch)
    stops = _stop_requests(monkeypatch, sm)
    first = training.train(settings).job
    second = training.train(settings).job
    ws = Workspace(tmp_path)
    ws.update_state(use=first)
    assert [r.job for r in ws.state().all_runs()] == [first, second]
    out = cli("stop", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    assert sorted(json.loads(out.stdout)["stopped"]) == sorted([f"training job {first}", f"training job {second}"])
    assert len(stops) == 2


def _update_endpoint_requests(monkeypatch):
    """moto has no UpdateEndpoint: check the request as SageMaker does (the endpoint and the new endpoint config
    must exist), point the moto endpoint at the new config, record the request."""
    import boto3
    from botocore.awsrequest import AWSResponse
    from moto.sagemaker import models as sm_models

    updates = []

    def handler(model, params, **_):
        params = json.loads(params["body"])
        sm = boto3.client("sagemaker", region_name="us-east-1")
        sm.describe_endpoint_config(EndpointConfigName=params["EndpointConfigName"])  # raises if it does not exist
        assert set(params) == {"EndpointName", "EndpointConfigName"}
        for backend in sm_models.sagemaker_backends.values():
            for region in backend.values():
                endpoint = region.endpoints[params["EndpointName"]]  # KeyError: no such endpoint
                endpoint.endpoint_config_name = params["EndpointConfigName"]
        updates.append(params)
        return AWSResponse("https://api.sagemaker", 200, {}, None), {
            "EndpointArn": f"arn:aws:sagemaker:us-east-1:123456789012:endpoint/{params['EndpointName']}",
            "ResponseMetadata": {"HTTPStatusCode": 200}}

    import botocore.session

    real_create = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = real_create(self, *args, **kwargs)
        if client.meta.service_model.service_name == "sagemaker":
            client.meta.events.register("before-call.sagemaker.UpdateEndpoint", handler)
        return client

    monkeypatch.setattr(botocore.session.Session, "create_client", create_client)
    return updates


def test_deploy_a_new_model_updates_the_running_endpoint(sm, tmp_path, monkeypatch):
    """Issue 23.6 on SageMaker: deploy --model NEW while the recorded endpoint runs updates it to a new endpoint
    config over a new model (before: a second endpoint, the first left running and forgotten); the same model again
    changes nothing; the old config and model are deleted."""
    import re

    from bincount.backends.sagemaker import endpoint as sm_endpoint

    for key in ("a/model.tar.gz", "b/model.tar.gz"):
        put_model_tar(key, key.encode())
    updates = _update_endpoint_requests(monkeypatch)
    first = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/a/model.tar.gz"}))
    assert first.action == "created" and len(sm.calls("CreateEndpoint")) == 1
    same = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/a/model.tar.gz"}))
    assert same.action == "already deployed" and len(sm.calls("CreateModel")) == 1

    second = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/b/model.tar.gz"}))
    assert second.action == "updated" and second.endpoint == first.endpoint
    assert len(sm.calls("CreateEndpoint")) == 1  # no second endpoint
    [update] = updates
    config = sm.last("CreateEndpointConfig")
    assert update == {"EndpointName": first.endpoint, "EndpointConfigName": config["EndpointConfigName"]}
    # the API's rules: names of 1-63 characters [a-zA-Z0-9-]; one variant with the new model and an instance type
    for value in (config["EndpointConfigName"], sm.last("CreateModel")["ModelName"]):
        assert re.fullmatch(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}", value), value
    [variant] = config["ProductionVariants"]
    assert variant["ModelName"] == second.model_name != first.model_name
    assert variant["InstanceType"] == "ml.m5.large" and variant["InitialInstanceCount"] == 1
    assert sm.last("DeleteEndpointConfig") == {"EndpointConfigName": first.config_name}
    assert sm.last("DeleteModel") == {"ModelName": first.model_name}
    state = Workspace(tmp_path).state().endpoint
    assert state.model_data == f"s3://{BUCKET}/b/model.tar.gz" and state.config_name == config["EndpointConfigName"]

    serverless = sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": f"s3://{BUCKET}/b/model.tar.gz",
                                                               "deploy.mode": "serverless"}))
    assert serverless.action == "updated" and len(updates) == 2
    [variant] = sm.last("CreateEndpointConfig")["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 5} and "InstanceType" not in variant


def test_redeploying_the_same_model_with_other_serving_settings_updates_the_endpoint(sm, tmp_path, monkeypatch):
    """The same artifact with another image, instance type or count, or serverless capacity is not "already
    deployed": each updates the endpoint (a new model and endpoint config); the same settings again change nothing."""
    from bincount.backends.sagemaker import endpoint as sm_endpoint

    put_model_tar("a/model.tar.gz")
    updates = _update_endpoint_requests(monkeypatch)
    model = {"deploy.model_data": f"s3://{BUCKET}/a/model.tar.gz"}
    image = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6.0-cpu-py312-ubuntu22.04-sagemaker"
    assert sm_endpoint.deploy(make_settings(tmp_path, **model)).action == "created"
    steps = [({"deploy.instance_type": "ml.c5.xlarge"}, {"InstanceType": "ml.c5.xlarge", "InitialInstanceCount": 1}),
             ({"deploy.instance_type": "ml.c5.xlarge", "deploy.instance_count": 2}, {"InitialInstanceCount": 2}),
             ({"deploy.instance_type": "ml.c5.xlarge", "deploy.instance_count": 2, "deploy.image_uri": image}, {}),
             ({"deploy.mode": "serverless"}, {"ServerlessConfig": {"MemorySizeInMB": 4096, "MaxConcurrency": 5}}),
             ({"deploy.mode": "serverless", "deploy.memory_size_mb": 2048},
              {"ServerlessConfig": {"MemorySizeInMB": 2048, "MaxConcurrency": 5}})]
    for n, (changed, variant) in enumerate(steps, 1):
        result = sm_endpoint.deploy(make_settings(tmp_path, **model, **changed))
        assert result.action == "updated" and len(updates) == n, changed
        [sent] = sm.last("CreateEndpointConfig")["ProductionVariants"]
        assert variant.items() <= sent.items(), (changed, sent)
        again = sm_endpoint.deploy(make_settings(tmp_path, **model, **changed))
        assert again.action == "already deployed" and len(updates) == n, changed
    assert [c["PrimaryContainer"]["Image"] for c in sm.calls("CreateModel")].count(image) == 1  # the image step's
    assert Workspace(tmp_path).state().endpoint.serving["memory_size_mb"] == 2048


def test_status_does_not_overwrite_a_training_record_written_meanwhile(sm, tmp_path, monkeypatch, cli):
    """status adds the profiler report to the record as it is when it writes (under the state lock): a
    `train` that recorded a newer job meanwhile keeps its record (issue 22.2)."""
    from bincount.backends.sagemaker import debugger, training
    from bincount.state import SageMakerTraining
    from bincount.workspace import Workspace

    settings = make_settings(tmp_path, **{"sagemaker.rules.wait_s": 0})
    record_channels(settings)
    jobs, finish, _ = _rules_finish_later(monkeypatch, polls_needed=10**6)
    training.train(settings)
    finish(jobs[-1])
    real = debugger.download_profiler_report

    def slow_download(*args, **kwargs):  # another process records a new job while status downloads
        Workspace(tmp_path).update_state(training=SageMakerTraining(job="bincount-newer", status="InProgress"))
        return real(*args, **kwargs)

    monkeypatch.setattr(debugger, "download_profiler_report", slow_download)
    out = cli("status", "--backend", "sagemaker", "--workdir", tmp_path, "--json")
    assert out.exit_code == 0, out.stderr
    assert Workspace(tmp_path).state().training.job == "bincount-newer"


@pytest.mark.parametrize("keep", [False, True])
def test_keep_checkpoint_reaches_the_jobs_and_a_completed_tuning_job_leaves_no_checkpoints(sm, tmp_path, monkeypatch,
                                                                                          keep):
    """train.keep_checkpoint on SageMaker: a training job and a tuning job's trials get --keep_checkpoint true
    (train.py then keeps its folder, which SageMaker syncs), and without it a completed tuning job's prefix
    (what trials the tuner stopped early left there) is deleted; other jobs' prefixes stay."""
    import boto3

    from bincount.backends.sagemaker import training, tuning

    s3 = boto3.client("s3", region_name="us-east-1")
    for key in ("ck/the-tuning/trial-1/.checkpoint.pt", "ck/the-tuning/trial-2/x", "ck/the-tuning-2/other.pt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"state")
    monkeypatch.setattr(tuning, "_tuning_job_name", lambda base: "the-tuning")
    settings = make_settings(tmp_path, **{"sagemaker.checkpoint_s3_uri": f"s3://{BUCKET}/ck", "train.keep_checkpoint": keep})
    record_channels(settings)
    assert training.train(settings).status == "Completed"
    assert tuning.tune(settings).status == "Completed"
    job_hp = sm.last("CreateTrainingJob")["HyperParameters"]
    trial_hp = sm.last("CreateHyperParameterTuningJob")["TrainingJobDefinition"]["StaticHyperParameters"]
    assert [hp.get("keep_checkpoint") for hp in (job_hp, trial_hp)] == (["true", "true"] if keep else [None, None])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="ck/")["Contents"]}
    left = {"ck/the-tuning/trial-1/.checkpoint.pt", "ck/the-tuning/trial-2/x"}
    assert keys == {"ck/the-tuning-2/other.pt"} | (left if keep else set())


def test_checkpoints_that_cannot_be_deleted_are_a_warning_not_a_lost_result(sm, tmp_path, capsys):
    """The tuning job's result is recorded after the clean-up: a prefix that cannot be deleted (here: no such
    bucket) is a warning naming it and `bincount cleanup`, never an error."""
    from bincount.aws import Aws
    from bincount.backends.sagemaker import jobs

    aws = Aws(make_settings(tmp_path))
    assert jobs.drop_checkpoints(aws, "s3://no-such-bucket-here/ck/the-tuning/", keep=False) == 0
    said = capsys.readouterr().err
    assert "warning: the checkpoints under s3://no-such-bucket-here/ck/the-tuning/ were not deleted" in said
    assert "bincount cleanup" in said and "Traceback" not in said
