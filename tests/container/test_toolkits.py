"""What SageMaker runs, run here: the training job the CLI asks for, through the real training toolkit; the
model the CLI deploys, through the real inference handler chain (harness: TrainingContainer, ModelServer)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest

from bincount.config import load_settings

from .conftest import TrainingContainer

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
BUCKET = "bincount-test"


def settings_for(workdir: Path, synth_source: Path | None = None, **overrides):
    base = {"workdir": workdir, "backend": "sagemaker", "s3.bucket": BUCKET, "sagemaker.role": ROLE,
            "sagemaker.instance_type": "ml.m5.xlarge", "sagemaker.use_spot_instances": True,
            "train.wait": False, "train.epochs": 1, "train.image_size": 32, "train.batch_size": 16,
            "train.arch": "mobilenet_v3_small", "train.warmup_epochs": 0, "sagemaker.rules.profiler_report": False}
    if synth_source is not None:
        base.update({"data.source": str(synth_source), "data.limit": 36})
    return load_settings(overrides={**base, **overrides}, environ={})


def last(requests, operation: str) -> dict:
    return [params for name, params in requests if name == operation][-1]


@pytest.mark.slow
def test_the_training_job_runs_in_the_sagemaker_training_toolkit(sagemaker_requests, synth_source, tmp_path):
    from bincount.backends.sagemaker import training
    from bincount.data.fetch import fetch
    from bincount.data.split import split
    from bincount.data.upload import upload

    settings = settings_for(tmp_path / "work", synth_source)
    fetch(settings)
    split(settings)
    upload(settings)
    training.train(settings)
    request = last(sagemaker_requests, "CreateTrainingJob")

    first = TrainingContainer(request, tmp_path / "job-1").layout()
    run = first.run()
    log = run.stdout + run.stderr  # what CloudWatch gets, and what the metric definitions read
    assert run.returncode == 0, log[-4000:]
    assert "Installing dependencies from requirements.txt" in log  # the hook is on: smdebug from requirements.txt
    assert (first.root / "output" / "success").is_file()

    # The model dir SageMaker tars into model.tar.gz.
    meta = json.loads((first.model / "meta.json").read_text())
    assert (first.model / "model.pth").is_file() and meta["arch"] == "mobilenet_v3_small"
    assert sorted(p.name for p in (first.model / "code").iterdir()) == [
        "epochlog.py", "inference.py", "net.py", "requirements.txt"]
    assert meta["hyperparameters"]["image_size"] == 32 and meta["weights"] is None

    # The request's metric definitions find every metric in the real log, and the objective's last value is
    # the kept epoch's.
    definitions = request["AlgorithmSpecification"]["MetricDefinitions"]
    found = {d["Name"]: re.findall(d["Regex"], log) for d in definitions}
    assert all(found.values()), {name: values for name, values in found.items() if not values}
    assert float(found["val_acc"][-1]) == pytest.approx(meta["metrics"]["val_acc"], abs=1e-4)

    # The Debugger hook, configured from the request's DebugHookConfig, wrote the collections the rules read,
    # inside a container with protobuf 6 (smdebug's generated code read by the pure-Python protobuf).
    from smdebug.trials import create_trial

    trial = create_trial(str(first.tensors))
    wanted = {c["CollectionName"] for c in request["DebugHookConfig"]["CollectionConfigurations"]}
    assert {"losses", "gradients"} <= wanted
    for collection in ("losses", "gradients"):
        assert trial.tensor_names(collection=collection), f"no {collection} tensors"

    # The job's checkpoint went to its own prefix, synced while it ran, and left it when the model was written
    # (issue 20.9); the next job gets a prefix of its own.
    assert request["CheckpointConfig"]["S3Uri"].endswith(f"/{request['TrainingJobName']}/")
    assert "removed this job's checkpoints" in log and first.checkpoint_keys() == set()
    training.train(settings)
    assert last(sagemaker_requests, "CreateTrainingJob")["CheckpointConfig"]["S3Uri"] != request["CheckpointConfig"]["S3Uri"]

    # Trials of a tuning job share one CheckpointConfig prefix, and SageMaker restores all of it into each new
    # trial. A trial interrupted after its first epoch (spot) keeps its checkpoint there; another trial gets it
    # restored but never loads it, and takes only its own away when it ends; the interrupted trial, restarted,
    # resumes its own and then removes it: the prefix ends empty.
    def trial(name: str, epochs: str) -> dict:
        return {**request, "TrainingJobName": name, "HyperParameters": {**request["HyperParameters"], "epochs": epochs}}

    # 50 epochs: the kill (within half a second of the first checkpoint) always lands before the end, however fast
    # the machine; the restart then asks for one epoch more than the checkpoint it gets back holds
    a, b = trial("tune-a-001-1a2b3c4d", "50"), trial("tune-a-002-5e6f7a8b", "1")
    first_trial = TrainingContainer(a, tmp_path / "trial-1").layout()
    interrupted = first_trial.run(interrupt_when=f"{a['TrainingJobName']}/checkpoint.pt")
    assert interrupted.returncode != 0
    import torch

    kept = torch.load(first_trial.checkpoints / a["TrainingJobName"] / "checkpoint.pt", weights_only=True)["epoch"]
    # A kill that lands during the next epoch's background write also leaves that write's temp file, and the sync
    # uploads it as it is: the restarted trial removes it (load_checkpoint), the others never read it.
    unfinished = f"{a['TrainingJobName']}/.checkpoint.pt.part"
    assert first.checkpoint_keys() - {unfinished} == {f"{a['TrainingJobName']}/checkpoint.pt"}
    other = TrainingContainer(b, tmp_path / "trial-2").layout()
    assert (other.checkpoints / a["TrainingJobName"] / "checkpoint.pt").is_file()  # restored with the prefix
    done = other.run()
    assert done.returncode == 0 and "resuming" not in done.stderr + done.stdout
    assert first.checkpoint_keys() - {unfinished} == {f"{a['TrainingJobName']}/checkpoint.pt"}  # only its own went
    restarted = trial(a["TrainingJobName"], str(kept + 1))
    again = TrainingContainer(restarted, tmp_path / "trial-1-restarted").layout().run()
    assert again.returncode == 0 and f"resuming after epoch {kept}" in again.stderr + again.stdout
    assert first.checkpoint_keys() == set()


def test_every_gpu_of_the_instance_gets_a_training_process(sagemaker_requests, tmp_path):
    """ml.g5.12xlarge has 4 GPUs: the job must start train.py once per GPU (torchrun through the toolkit's
    torch_distributed), not train on cuda:0 alone as it did when distribution was set only for instance_count > 1.
    The toolkit counts GPUs with nvidia-smi and launches torchrun: both are stand-ins on PATH here (no GPU), the
    second recording the command the real toolkit built from the real request."""
    import os
    import stat
    import sys

    import boto3

    from bincount.backends.sagemaker import training
    from bincount.workspace import Workspace

    instance, gpus = "ml.g5.12xlarge", 4
    settings = settings_for(tmp_path / "work", **{"sagemaker.instance_type": instance,
                                                   "sagemaker.use_spot_instances": False})
    s3 = boto3.client("s3", region_name="us-east-1")
    for split in ("train", "val"):
        s3.put_object(Bucket=BUCKET, Key=f"bincount/{split}/manifest.jsonl", Body=b'{"count": 1, "image": "images/1.jpg"}\n')
    Workspace(settings.workdir).update_state(channels={s: f"s3://{BUCKET}/bincount/{s}/" for s in ("train", "val")})
    training.train(settings)
    request = last(sagemaker_requests, "CreateTrainingJob")
    assert request["ResourceConfig"]["InstanceType"] == instance
    assert request["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"

    bin_dir, record = tmp_path / "bin", tmp_path / "torchrun.json"
    bin_dir.mkdir()
    fakes = {"nvidia-smi": "\n".join(f"print('GPU {i}: NVIDIA A10G (UUID: GPU-{i})')" for i in range(gpus)),
             "torchrun": f"import json, sys; json.dump(sys.argv[1:], open({str(record)!r}, 'w'))"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    container = TrainingContainer(request, tmp_path / "job").layout()
    run = container.run(env_extra={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    argv = json.loads(record.read_text())
    assert argv[:4] == ["--nnodes", "1", "--nproc_per_node", str(gpus)] and argv[4].endswith("train.py")


def _images() -> dict[str, bytes]:
    from PIL import Image

    out = {}
    for fmt, colour in (("JPEG", (200, 40, 40)), ("PNG", (30, 160, 90))):
        picture = Image.new("RGB", (48, 40), colour)
        picture.paste((250, 250, 250), (5, 5, 20, 18))
        buf = io.BytesIO()
        picture.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def test_the_deployed_model_serves_through_the_sagemaker_inference_handler_chain(sagemaker_requests, model_server,
                                                                                 tmp_path, monkeypatch):
    """The model.tar.gz CreateModel points to (the SDK's repack of our artifact), served by the PyTorch inference
    image's HandlerService: answers identical to the in-process handlers `bincount serve` uses."""
    import sagemaker.session

    from bincount.artifacts import package_model, write_model_dir
    from bincount.backends.sagemaker import endpoint as sm_endpoint
    from bincount.container import inference

    monkeypatch.setattr(sagemaker.session.time, "sleep", lambda seconds: None)  # moto endpoints are ready at once
    model_dir = write_model_dir(tmp_path / "trained", "mobilenet_v3_small", seed=5)
    tar = package_model(model_dir, tmp_path / "model.tar.gz")
    sm_endpoint.deploy(settings_for(tmp_path / "work", **{"deploy.model_data": str(tar)}))
    server = model_server(last(sagemaker_requests, "CreateModel"))
    assert (server.model_dir / "code" / "inference.py").is_file() and not (server.model_dir / "code" / "train.py").exists()

    bundle = inference.model_fn(str(model_dir))

    def local(body, content_type):  # what `bincount serve` answers: the same handlers in this process
        return json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(body, content_type), bundle)))

    images = _images()
    batch = json.dumps({"instances": [base64.b64encode(b).decode() for b in images.values()]}).encode()
    for body, content_type in ((images["JPEG"], "image/jpeg"), (images["PNG"], "image/png"), (batch, "application/json")):
        status, answered_type, response = server.invoke(body, content_type)
        assert (status, answered_type) == (200, "application/json")
        assert json.loads(response) == local(body, content_type)

    for body, content_type, expected in ((b"not an image", "image/jpeg", 400), (b"1,2,3", "text/csv", 415),
                                         (b'{"instances": "nope"}', "application/json", 400),
                                         (b"[", "application/json", 400)):
        status, _, response = server.invoke(body, content_type)
        assert status == expected, (status, response)
        with pytest.raises(inference.RequestError) as err:
            local(body, content_type)
        assert err.value.status == expected and str(response).startswith(err.value.message)
    status, _, _ = server.invoke(images["JPEG"], "image/jpeg", accept="text/csv")
    assert status == 406
    # Where they differ: the toolkit decodes application/json and text/csv bodies as UTF-8 before any handler
    # runs, so binary bytes sent with those types are its 500 (bincount serve: 400/415). README says so.
    status, _, response = server.invoke(images["PNG"], "text/csv")
    assert status == 500 and "codec can't decode" in response
