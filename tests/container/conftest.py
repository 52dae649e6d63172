"""Channel folders (train/val/test manifest.jsonl over the synthetic bins) as SageMaker hands them to train.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "src" / "bincount" / "container" / "train.py"
FAST = ["--arch", "mobilenet_v3_small", "--image_size", "32", "--batch_size", "32", "--num_classes", "6",
        "--warmup_epochs", "0", "--lr", "0.003"]


@pytest.fixture(scope="session")
def channels(synth_source: Path, tmp_path_factory) -> dict[str, Path]:
    """train (72 images, image paths relative to the channel), val (24, absolute), test (24, absolute)."""
    root = tmp_path_factory.mktemp("channels")
    labels = sorted((synth_source / "metadata").glob("*.json"))
    rows = [{"id": p.stem, "count": json.loads(p.read_text())["EXPECTED_QUANTITY"]} for p in labels]
    parts = {"train": rows[:72], "val": rows[72:96], "test": rows[96:]}
    out = {}
    for split, items in parts.items():
        folder = root / split
        (folder / "images").mkdir(parents=True)
        lines = []
        for row in items:
            source = synth_source / "bin-images" / f"{row['id']}.jpg"
            if split == "train":  # the S3 layout: images/<id>.jpg beside the manifest
                (folder / "images" / source.name).write_bytes(source.read_bytes())
                image = f"images/{source.name}"
            else:
                image = str(source)
            lines.append(json.dumps({**row, "image": image}))
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        out[split] = folder
    return out


def sm_env(channels: dict[str, Path], run: Path) -> dict[str, str]:
    """The SM_* variables SageMaker sets for train.py: output folders under `run`, the train and val channels."""
    return {
        "SM_MODEL_DIR": str(run / "model"), "SM_OUTPUT_DATA_DIR": str(run / "output" / "data"),
        "SM_OUTPUT_DIR": str(run / "output"), "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": "0", "SM_CHANNEL_TRAIN": str(channels["train"]), "SM_CHANNEL_VAL": str(channels["val"]),
        "SM_CHECKPOINT_DIR": str(run / "checkpoints"),
    }


def run_train(channels: dict[str, Path], run: Path, *args: str, env: dict[str, str] | None = None,
              launcher: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run train.py as SageMaker does: its own process, SM_* variables and --name value hyperparameters.
    One test per contract of the script runs it so; tests of a code path inside it use train_here."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    full_env.update(sm_env(channels, run))
    full_env.update(env or {})
    command = [*(launcher or [sys.executable]), str(SCRIPT), *FAST, *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


def train_here(channels: dict[str, Path], run: Path, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """train.py's main() in this process with what run_train gives the script (SM_* variables, FAST, args): the
    same exit code, stdout and stderr without a new interpreter and torch import; os.environ is restored."""
    from bincount.container import train

    saved, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    try:
        for name in [n for n in os.environ if n.startswith("SM_")]:
            del os.environ[name]
        os.environ.update({**sm_env(channels, run), **(env or {})})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train.main([*FAST, *args])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["train.py", *FAST, *args], code, out.getvalue(), err.getvalue())


# -- SageMaker's own container code: the training toolkit and the inference handler chain ---------------------------
# `make install` puts the training toolkit as the PyTorch training image has it (sagemaker-training with
# sagemaker-pytorch-training, protobuf 6, no smdebug) in <venv>/toolkits, a --target folder that only the
# container's process sees: the main venv keeps smdebug's protobuf 3.20.3.
TOOLKITS = Path(sys.prefix) / "toolkits"


def _s3():
    import boto3

    return boto3.client("s3", region_name="us-east-1")


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def s3_download_prefix(uri: str, dest: Path) -> list[Path]:
    """Every object under an S3 prefix, at its path relative to the prefix (File mode, S3Prefix); an
    object's own URI gives that one file under its base name."""
    bucket, prefix = _split(uri)
    s3, files = _s3(), []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):].lstrip("/") or Path(obj["Key"]).name
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            files.append(target)
    return files


class TrainingContainer:
    """A SageMaker training container's /opt/ml laid out under `root` from a CreateTrainingJob request, run
    through the real toolkit as the PyTorch DLC starts it.

    What SageMaker does before the image starts is done here from the request: input/config/
    hyperparameters.json, inputdataconfig.json, resourceconfig.json and debughookconfig.json; every channel
    copied from S3 as File mode lays it out (input/data/<channel>/); the CheckpointConfig prefix restored
    into checkpoints/ (run() mirrors it back while the job runs, deletions included, as SageMaker does). Then the
    image's entry point: sagemaker_training.cli.train with SAGEMAKER_TRAINING_MODULE=
    sagemaker_pytorch_container.training:main, which downloads sourcedir.tar.gz, pip-installs its
    requirements.txt (offline here: PIP_NO_INDEX, and --dry-run so the shared venv never changes) and runs
    train.py with SM_* variables and --name value arguments.

    Redirected, because /opt/ml cannot be used here: SAGEMAKER_BASE_DIR (the toolkit's supported override),
    SM_CHECKPOINT_DIR and SMDEBUG_CONFIG_FILE_PATH (the two paths train.py and smdebug read outside the
    toolkit), the hook's LocalPath, and sagemaker_submit_directory (the toolkit would fetch the archive from
    S3 itself, which this subprocess cannot reach: the test's S3 is moto in-process). SM_STUDIO_LOCAL_MODE
    skips the wait for the DNS name algo-1.
    """

    def __init__(self, request: dict, root: Path):
        self.request, self.root = request, root
        self.job = request["TrainingJobName"]
        self.checkpoints = root / "checkpoints"
        self.tensors = root / "output" / "tensors"
        self.model = root / "model"

    def layout(self) -> TrainingContainer:
        req, root = self.request, self.root
        config = root / "input" / "config"
        config.mkdir(parents=True)
        channels = {c["ChannelName"]: c for c in req.get("InputDataConfig", [])}
        for name, channel in channels.items():
            s3_download_prefix(channel["DataSource"]["S3DataSource"]["S3Uri"], root / "input" / "data" / name)
        hp = dict(req["HyperParameters"])
        submit = json.loads(hp["sagemaker_submit_directory"])
        if submit.startswith("s3://"):
            local = root / "sourcedir.tar.gz"
            bucket, key = _split(submit)
            _s3().download_file(bucket, key, str(local))
        else:  # network isolation: the SDK sent the archive as the `code` channel
            local = root / Path(submit).relative_to("/opt/ml")
        hp["sagemaker_submit_directory"] = json.dumps(str(local))
        (config / "hyperparameters.json").write_text(json.dumps(hp))
        mode = req["AlgorithmSpecification"].get("TrainingInputMode", "File")
        (config / "inputdataconfig.json").write_text(json.dumps({
            name: {"TrainingInputMode": c.get("InputMode", mode), "RecordWrapperType": c.get("RecordWrapperType", "None"),
                   "S3DistributionType": c["DataSource"]["S3DataSource"].get("S3DistributionType", "FullyReplicated")}
            for name, c in channels.items()}))
        instance = req["ResourceConfig"]["InstanceType"]
        (config / "resourceconfig.json").write_text(json.dumps({
            "current_host": "algo-1", "current_instance_type": instance, "current_group_name": "homogeneousCluster",
            "hosts": ["algo-1"], "network_interface_name": "eth0",
            "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance, "hosts": ["algo-1"]}]}))
        if "DebugHookConfig" in req:
            hook = {**req["DebugHookConfig"], "LocalPath": str(self.tensors)}
            (config / "debughookconfig.json").write_text(json.dumps(hook))
        self.checkpoints.mkdir()
        self._synced: dict[str, int] = {}  # checkpoint files in S3: relative path -> mtime when put there
        if "CheckpointConfig" in req:
            for path in s3_download_prefix(req["CheckpointConfig"]["S3Uri"], self.checkpoints):
                self._synced[path.relative_to(self.checkpoints).as_posix()] = path.stat().st_mtime_ns
        return self

    def run(self, timeout: int = 600, env_extra: dict[str, str] | None = None,
            interrupt_when: str | None = None) -> subprocess.CompletedProcess:
        """Run the job, syncing checkpoints/ with the CheckpointConfig prefix while it runs and when it ends, as
        SageMaker does. interrupt_when: kill the job once that file exists under checkpoints/ (a spot interruption)."""
        if not (TOOLKITS / "sagemaker_training").is_dir():
            pytest.fail(f"the SageMaker training toolkit is not in {TOOLKITS}: run make install")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "SAGEMAKER_", "PIP_"))}
        env.update({
            "PYTHONPATH": str(TOOLKITS), "SAGEMAKER_BASE_DIR": str(self.root),
            "SAGEMAKER_TRAINING_MODULE": "sagemaker_pytorch_container.training:main",
            "TRAINING_JOB_NAME": self.job, "TRAINING_JOB_ARN": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{self.job}",
            "SM_STUDIO_LOCAL_MODE": "true", "SM_CHECKPOINT_DIR": str(self.checkpoints),
            "SMDEBUG_CONFIG_FILE_PATH": str(self.root / "input" / "config" / "debughookconfig.json"),
            "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_DRY_RUN": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        })
        env.update(self.request.get("Environment") or {})
        env.update(env_extra or {})
        command = [sys.executable, "-c", "from sagemaker_training.cli.train import main; main()"]
        job = subprocess.Popen(command, env=env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                out, err = job.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                self.sync_checkpoints()
                if (interrupt_when and (self.checkpoints / interrupt_when).is_file()) or time.monotonic() > deadline:
                    os.killpg(job.pid, signal.SIGKILL)
                    out, err = job.communicate()
                    if not interrupt_when:
                        raise subprocess.TimeoutExpired(command, timeout, out, err) from None
                    break
        self.sync_checkpoints()
        return subprocess.CompletedProcess(command, job.returncode, out, err)

    def sync_checkpoints(self) -> None:
        """Mirror checkpoints/ to the CheckpointConfig prefix, as SageMaker does during the job: new and changed
        files are uploaded, and a file deleted in the container is deleted in S3 too (the SageMaker guide's words)."""
        if "CheckpointConfig" not in self.request:
            return
        bucket, prefix = _split(self.request["CheckpointConfig"]["S3Uri"])
        local = {p.relative_to(self.checkpoints).as_posix(): p for p in self.checkpoints.rglob("*") if p.is_file()}
        for rel, path in local.items():
            try:
                mtime = path.stat().st_mtime_ns
                if self._synced.get(rel) != mtime:
                    _s3().upload_file(str(path), bucket, prefix + rel)
                    self._synced[rel] = mtime
            except FileNotFoundError:  # renamed or removed while we looked (a .part file becoming the checkpoint)
                pass
        for rel in set(self._synced) - set(local):
            _s3().delete_object(Bucket=bucket, Key=prefix + rel)
            del self._synced[rel]

    def checkpoint_keys(self) -> set[str]:
        """The keys under the CheckpointConfig prefix, relative to it."""
        bucket, prefix = _split(self.request["CheckpointConfig"]["S3Uri"])
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])}


class ModelServer:
    """The PyTorch inference image's handler chain over the model a CreateModel request points to.

    SageMaker extracts ModelDataUrl into /opt/ml/model (here a temp dir) and starts TorchServe, a Java model
    server that cannot run here, whose Python worker calls sagemaker-pytorch-inference's HandlerService
    (sagemaker-inference's DefaultHandlerService and Transformer over our code/inference.py) with code/ on
    its PYTHONPATH. This class is that worker: the real HandlerService, the container's environment from
    the request, and a minimal stand-in for TorchServe's per-request Context (headers in, status and
    content type out).
    """

    def __init__(self, create_model_request: dict, root: Path, monkeypatch):
        import tarfile

        container = create_model_request.get("PrimaryContainer") or create_model_request["Containers"][0]
        self.model_dir = root / "model"
        self.model_dir.mkdir(parents=True)
        tar = root / "model.tar.gz"
        bucket, key = _split(container["ModelDataUrl"])
        _s3().download_file(bucket, key, str(tar))
        with tarfile.open(tar) as archive:
            archive.extractall(self.model_dir, filter="data")
        for name, value in (container.get("Environment") or {}).items():
            monkeypatch.setenv(name, value)
        monkeypatch.syspath_prepend(str(self.model_dir / "code"))
        for name in ("inference", "net", "epochlog"):  # the artifact's own modules, not a copy imported before
            monkeypatch.delitem(sys.modules, name, raising=False)
        from sagemaker_pytorch_serving_container.handler_service import HandlerService

        self.service = HandlerService()
        self.service.initialize(self.context({}))

    def context(self, headers: dict):
        model_dir = str(self.model_dir)

        class RequestProcessor:
            def get_request_properties(self):
                return headers

        class Context:  # what the toolkit reads from and writes to TorchServe's ts.context.Context
            model_name, system_properties = "model", {"model_dir": model_dir, "gpu_id": None}
            request_processor = [RequestProcessor()]
            status, phrase, content_type = 200, "OK", None

            def set_response_content_type(self, index, value):
                self.content_type = value

            def set_response_status(self, code=200, phrase="", idx=0):
                self.status, self.phrase = code, phrase

        return Context()

    def invoke(self, body: bytes, content_type: str, accept: str = "application/json") -> tuple[int, str | None, object]:
        """(HTTP status, response content type, response body) for one request, as the worker answers it."""
        context = self.context({"Content-Type": content_type, "Accept": accept})
        [response] = self.service.handle([{"body": body}], context)
        return context.status, context.content_type, response


@pytest.fixture
def model_server(tmp_path, monkeypatch):
    """model_server(create_model_request) -> ModelServer over the exact model.tar.gz the request points to."""
    return lambda request: ModelServer(request, tmp_path / "inference-container", monkeypatch)
