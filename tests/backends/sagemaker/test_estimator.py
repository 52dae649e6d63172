"""What a SageMaker training job gets from the CLI (the requests moto captured): its code and requirements,
its environment, its own checkpoint prefix, and the pretrained weights as an input channel."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bincount.config import load_settings
from bincount.errors import BincountError

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "bincount-test"
TENSOR_RULES = ("vanishing_gradient", "overfit", "overtraining", "poor_weight_initialization", "loss_not_decreasing")


def make_settings(workdir: Path, **overrides):
    base = {"workdir": workdir, "backend": "sagemaker", "s3.bucket": BUCKET, "sagemaker.role": ROLE,
            "train.epochs": 1, "train.image_size": 32, "train.wait": False, "tune.wait": False, "tune.max_jobs": 2}
    return load_settings(overrides={**base, **overrides}, environ={})


def record_channels(settings) -> None:
    import boto3

    from bincount.workspace import Workspace

    s3 = boto3.client("s3", region_name="us-east-1")
    for split in ("train", "val"):
        s3.put_object(Bucket=BUCKET, Key=f"bincount/{split}/manifest.jsonl", Body=b'{"count": 1, "image": "images/1.jpg"}\n')
    Workspace(settings.workdir).update_state(channels={s: f"s3://{BUCKET}/bincount/{s}/" for s in ("train", "val")})


def start_job(settings, requests) -> dict:
    from bincount.backends.sagemaker import training

    training.train(settings)
    return [p for op, p in requests if op == "CreateTrainingJob"][-1]


def s3_object(uri: str) -> bytes:
    import boto3

    bucket, key = uri[5:].split("/", 1)
    return boto3.client("s3", region_name="us-east-1").get_object(Bucket=bucket, Key=key)["Body"].read()


def source_dir(request: dict) -> dict[str, bytes]:
    """The files of the sourcedir.tar.gz the job's toolkit gets (sagemaker_submit_directory; under network
    isolation the SDK sends it as the `code` channel and points the hyperparameter at that channel's file)."""
    uri = json.loads(request["HyperParameters"]["sagemaker_submit_directory"])
    if not uri.startswith("s3://"):
        code = {c["ChannelName"]: c for c in request["InputDataConfig"]}["code"]["DataSource"]["S3DataSource"]["S3Uri"]
        uri = code.rstrip("/") + "/" + Path(uri).name if not code.endswith(".tar.gz") else code
    tar = s3_object(uri)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}


def test_each_training_job_and_each_tuning_job_has_its_own_checkpoint_prefix(sagemaker_requests, tmp_path):
    from bincount.backends.sagemaker import tuning

    settings = make_settings(tmp_path, **{"sagemaker.use_spot_instances": True})
    record_channels(settings)
    first, second = start_job(settings, sagemaker_requests), start_job(settings, sagemaker_requests)
    for request in (first, second):
        assert request["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/bincount/checkpoints/{request['TrainingJobName']}/"
    assert first["TrainingJobName"] != second["TrainingJobName"]

    # An explicit checkpoint_s3_uri is the base the job's own prefix goes under.
    third = start_job(make_settings(tmp_path, **{"sagemaker.checkpoint_s3_uri": f"s3://{BUCKET}/ck"}), sagemaker_requests)
    assert third["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/ck/{third['TrainingJobName']}/"

    # A tuning job's trials share one CheckpointConfig: the tuning job's prefix (train.py keeps each trial
    # in a subfolder named by TRAINING_JOB_NAME; tests/container/test_train.py runs that).
    tuned = tuning.tune(settings)
    definition = [p for op, p in sagemaker_requests if op == "CreateHyperParameterTuningJob"][-1]["TrainingJobDefinition"]
    assert definition["CheckpointConfig"]["S3Uri"] == f"s3://{BUCKET}/bincount/checkpoints/{tuned.job}/"


def test_tuning_trials_install_nothing(sagemaker_requests, tmp_path):
    """A tuning job's trials carry no Debugger hook or rules (its TrainingJobDefinition has no DebugHookConfig), so
    smdebug is never used there: shipping requirements.txt cost minutes per trial and failed every trial in a VPC
    without a NAT."""
    from bincount.backends.sagemaker import tuning

    settings = make_settings(tmp_path)  # every tensor rule on, as by default
    record_channels(settings)
    tuning.tune(settings)
    definition = [p for op, p in sagemaker_requests if op == "CreateHyperParameterTuningJob"][-1]["TrainingJobDefinition"]
    assert "DebugHookConfig" not in definition and "DebugRuleConfigurations" not in definition
    files = source_dir({"HyperParameters": definition["StaticHyperParameters"],
                        "InputDataConfig": definition["InputDataConfig"]})
    assert "train.py" in files and "requirements.txt" not in files
    assert "PIP_NO_DEPS" not in (definition.get("Environment") or {})


def test_requirements_reach_a_job_only_when_the_debugger_hook_needs_smdebug(sagemaker_requests, tmp_path):
    settings = make_settings(tmp_path)
    record_channels(settings)
    with_hook = start_job(settings, sagemaker_requests)
    files = source_dir(with_hook)
    assert {"train.py", "net.py", "epochlog.py", "inference.py", "smdebug_compat.py", "requirements.txt"} <= set(files)
    assert "smdebug==1.0.34" in files["requirements.txt"].decode().splitlines()
    assert with_hook["Environment"]["PIP_NO_DEPS"] == "1"  # the toolkit's pip install -r installs these lines only
    assert "DebugHookConfig" in with_hook

    # No rule reads tensors: no hook, nothing to install, so the job needs no network at all.
    no_rules = make_settings(tmp_path, **{f"sagemaker.rules.{r}": False for r in TENSOR_RULES})
    without_hook = start_job(no_rules, sagemaker_requests)
    assert "requirements.txt" not in source_dir(without_hook) and "train.py" in source_dir(without_hook)
    assert "PIP_NO_DEPS" not in (without_hook.get("Environment") or {})

    # Network isolation: the hook may stay (rules read what it writes), but nothing is installed.
    isolated = start_job(make_settings(tmp_path, **{"sagemaker.enable_network_isolation": True}), sagemaker_requests)
    assert isolated["EnableNetworkIsolation"] is True
    assert "requirements.txt" not in source_dir(isolated)


def _metadata_wheel(dist_name: str, folder: Path) -> None:
    """A wheel holding only the installed distribution's real METADATA: enough for pip's resolver."""
    from importlib.metadata import distribution

    dist = distribution(dist_name)
    name, version = dist.metadata["Name"].replace("-", "_"), dist.version
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", dist.read_text("METADATA"))
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def test_installing_smdebug_leaves_torch_numpy_and_protobuf_alone(sagemaker_requests, tmp_path):
    """pip's real resolver, offline, over the job's requirements.txt and environment: it installs the listed
    packages and nothing else (smdebug's own metadata asks protobuf<=3.20.3, numpy, boto3)."""
    from packaging.requirements import Requirement

    settings = make_settings(tmp_path)
    record_channels(settings)
    request = start_job(settings, sagemaker_requests)
    requirements = source_dir(request)["requirements.txt"].decode()
    listed = {Requirement(line).name.lower() for line in requirements.splitlines() if line.strip() and not line.startswith("#")}
    assert listed.isdisjoint({"torch", "torchvision", "numpy", "protobuf"})

    (tmp_path / "req.txt").write_text(requirements)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("smdebug", "pyinstrument", "pyinstrument-cext"):
        _metadata_wheel(name, wheels)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, **request.get("Environment", {}),
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), "-r", str(tmp_path / "req.txt")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]  # without PIP_NO_DEPS pip needs protobuf, numpy, boto3, ...
    installed = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert installed == {"smdebug", "pyinstrument", "pyinstrument-cext"}


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_imagenet_weights_reach_the_job_as_a_channel_uploaded_once(sagemaker_requests, tmp_path, torch_home, monkeypatch):
    import hashlib

    from bincount.backends.sagemaker import estimator
    from bincount.container import net

    cached = net.imagenet_cache_file("resnet18")
    assert str(cached).startswith(str(torch_home))
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"pretend resnet18 ImageNet weights")
    digest = hashlib.sha256(cached.read_bytes()).hexdigest()
    logged = []
    monkeypatch.setattr(estimator, "log", logged.append)

    settings = make_settings(tmp_path, **{"train.pretrained": "imagenet", "sagemaker.enable_network_isolation": True})
    record_channels(settings)
    first, second = start_job(settings, sagemaker_requests), start_job(settings, sagemaker_requests)
    uri = f"s3://{BUCKET}/bincount/weights/{cached.stem}-{digest[:16]}.pth"
    for request in (first, second):
        channels = {c["ChannelName"]: c for c in request["InputDataConfig"]}
        assert channels["weights"]["DataSource"]["S3DataSource"]["S3Uri"] == uri
        assert json.loads(request["HyperParameters"]["pretrained"]) == "imagenet"
        assert json.loads(request["HyperParameters"]["weights_source"]) == uri
    assert s3_object(uri) == cached.read_bytes()
    assert sum("uploading" in line for line in logged) == 1  # idempotent: the digest is in the name

    # An s3:// URI is the channel as it is; a local file (relative: made absolute by the settings) goes up once.
    given = start_job(make_settings(tmp_path, **{"train.pretrained": uri}), sagemaker_requests)
    assert {c["ChannelName"]: c for c in given["InputDataConfig"]}["weights"]["DataSource"]["S3DataSource"]["S3Uri"] == uri
    assert json.loads(given["HyperParameters"]["pretrained"]) == "channel"
    (tmp_path / "mine.pth").write_bytes(b"my own weights")
    monkeypatch.chdir(tmp_path)
    local = start_job(make_settings(tmp_path, **{"train.pretrained": "mine.pth"}), sagemaker_requests)
    local_uri = {c["ChannelName"]: c for c in local["InputDataConfig"]}["weights"]["DataSource"]["S3DataSource"]["S3Uri"]
    assert local_uri.startswith(f"s3://{BUCKET}/bincount/weights/mine-") and s3_object(local_uri) == b"my own weights"


def test_imagenet_weights_not_cached_are_downloaded_by_the_job_unless_isolated(sagemaker_requests, tmp_path, torch_home):
    settings = make_settings(tmp_path, **{"train.pretrained": "imagenet"})
    record_channels(settings)
    request = start_job(settings, sagemaker_requests)
    assert "weights" not in {c["ChannelName"] for c in request["InputDataConfig"]}
    assert request["HyperParameters"]["download_weights"] == "true"

    before = len(sagemaker_requests)
    with pytest.raises(BincountError, match="network-isolated job cannot download them"):
        start_job(make_settings(tmp_path, **{"train.pretrained": "imagenet", "sagemaker.enable_network_isolation": True}),
                  sagemaker_requests)
    assert not [op for op, _ in sagemaker_requests[before:] if op == "CreateTrainingJob"]


def test_the_training_source_dir_ships_every_container_module_the_scripts_import():
    """train.py runs on SageMaker from the source_dir alone: a sibling module it imports, directly or through
    another sibling, but the job does not ship is a ModuleNotFoundError on AWS (shards.py once was)."""
    import ast

    from bincount.backends.sagemaker.estimator import TRAINING_FILES
    from bincount.backends.sagemaker.jobs import container_dir

    folder = container_dir()
    siblings = {p.stem for p in folder.glob("*.py")}

    def imports(name: str) -> set[str]:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        return found & siblings

    for script in ("train", "inference"):
        needed, todo = set(), [script]
        while todo:  # every sibling reachable from the script
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo += imports(name)
        missing = {f"{name}.py" for name in needed} - set(TRAINING_FILES)
        assert not missing, f"{script} imports {sorted(missing)}, which the training job does not ship"
