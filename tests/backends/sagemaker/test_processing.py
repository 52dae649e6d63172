"""`shard --backend sagemaker` under moto: the Processing job is recorded, its channels count only once it has
completed (train refuses while it runs or after it failed; status refreshes it), its code and item lists lie
under s3.prefix (cleanup deletes them), and it stops like the other jobs (`stop`, Ctrl-C, `cleanup`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bincount_test_sagemaker", Path(__file__).with_name("test_sagemaker.py"))
_sagemaker_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sagemaker_tests)
sm = _sagemaker_tests.sm  # the moto SageMaker fixture with request capture (shared, not copied)
BUCKET, ROLE = _sagemaker_tests.BUCKET, _sagemaker_tests.ROLE


def processing_status(monkeypatch, box: dict):
    """moto's Processing jobs are Completed when created: here they are box["status"] until the test changes it."""
    from moto.sagemaker import models as sm_models

    real_init = sm_models.FakeProcessingJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        box["job"] = self
        self.processing_job_status = box["status"]

    monkeypatch.setattr(sm_models.FakeProcessingJob, "__init__", init)


def stop_requests(monkeypatch):
    """moto has no StopTransformJob (and its StopProcessingJob jumps to Stopped): record the serialized request,
    answer as SageMaker does (empty), and mark the moto job Stopping."""
    import botocore.session
    from botocore.awsrequest import AWSResponse
    from moto.sagemaker import models as sm_models

    stops = []

    def handler(model, params, **_):
        params = json.loads(params["body"])
        stops.append((model.name, params))
        for backend in sm_models.sagemaker_backends.values():
            for region in backend.values():
                for job in region.transform_jobs.values():
                    if job.transform_job_name == params.get("TransformJobName"):
                        job.transform_job_status = "Stopping"
                for job in region.processing_jobs.values():
                    if job.processing_job_name == params.get("ProcessingJobName"):
                        job.processing_job_status = "Stopping"
        return AWSResponse("https://api.sagemaker", 200, {}, None), {"ResponseMetadata": {"HTTPStatusCode": 200}}

    real_create = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = real_create(self, *args, **kwargs)
        if client.meta.service_model.service_name == "sagemaker":
            for op in ("StopTransformJob", "StopProcessingJob", "StopTrainingJob", "StopHyperParameterTuningJob"):
                client.meta.events.register(f"before-call.sagemaker.{op}", handler)
        return client

    monkeypatch.setattr(botocore.session.Session, "create_client", create_client)
    return stops


def _splits(tmp_path):
    from bincount.workspace import Workspace, write_jsonl

    ws = Workspace(tmp_path)
    for split, ids in {"train": range(1, 9), "val": range(9, 12), "test": range(12, 15)}.items():
        write_jsonl(ws.split(split), [{"id": f"{n:05d}", "count": n % 3, "skus": 1, "bytes": 100,
                                        "image": f"bin-images/{n:05d}.jpg"} for n in ids])
    return ws


BASE = ("--backend", "sagemaker", "--set", f"s3.bucket={BUCKET}", "--set", f"sagemaker.role={ROLE}")


def test_channels_count_only_once_the_processing_job_has_completed(sm, tmp_path, cli, monkeypatch):
    import boto3

    ws = _splits(tmp_path)
    box = {"status": "InProgress"}
    processing_status(monkeypatch, box)
    out = cli("shard", *BASE, "--workdir", tmp_path, "--no-wait", "--json")
    assert out.exit_code == 0, out.stderr
    job = sm.last("CreateProcessingJob")["ProcessingJobName"]
    state = ws.state()
    assert state.processing.job == job and state.processing.status == "InProgress"
    assert state.channels == {} and state.channel_format is None  # nothing written yet: no channels

    # code and item lists under s3.prefix, where cleanup finds them (not the SDK's s3://<bucket>/<job>/)
    inputs = {i["InputName"]: i["S3Input"]["S3Uri"] for i in sm.last("CreateProcessingJob")["ProcessingInputs"]}
    assert inputs == {"items": f"s3://{BUCKET}/bincount/processing/{job}/items",
                      "code": f"s3://{BUCKET}/bincount/processing/{job}/code/shards.py"}
    keys = {o["Key"] for o in boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert keys == {f"bincount/processing/{job}/items/{s}.jsonl" for s in ("train", "val", "test")} | {
        f"bincount/processing/{job}/code/shards.py"}

    # while it runs, train refuses in one line and starts nothing
    train = ("train", *BASE, "--workdir", tmp_path, "--no-wait")
    out = cli(*train)
    assert out.exit_code == 1 and f"the shard processing job {job} is InProgress" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not sm.calls("CreateTrainingJob")

    # status shows it; once it has completed, status records its channels
    out = cli("status", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--json")
    assert json.loads(out.stdout)["processing"]["status"] == "InProgress" and ws.state().channels == {}
    box["job"].processing_job_status = "Completed"
    out = cli("status", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--json")
    shown = json.loads(out.stdout)
    assert shown["processing"]["status"] == "Completed"
    assert shown["channels"] == {s: f"s3://{BUCKET}/bincount/shards/{s}" for s in ("train", "val", "test")}
    assert ws.state().channel_format == "shards" and ws.state().processing.status == "Completed"
    out = cli(*train, "--json")
    assert out.exit_code == 0, out.stderr
    uri = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in sm.last("CreateTrainingJob")["InputDataConfig"]}
    assert uri["train"] == f"s3://{BUCKET}/bincount/shards/train"


def test_a_failed_processing_job_leaves_no_channels_and_train_says_so(sm, tmp_path, cli, monkeypatch):
    ws = _splits(tmp_path)
    box = {"status": "InProgress"}
    processing_status(monkeypatch, box)
    assert cli("shard", *BASE, "--workdir", tmp_path, "--no-wait").exit_code == 0
    job = ws.state().processing.job
    box["job"].processing_job_status = "Failed"  # ended meanwhile: train itself finds out
    out = cli("train", *BASE, "--workdir", tmp_path, "--no-wait")
    assert out.exit_code == 1 and f"the shard processing job {job} ended Failed" in out.stderr
    assert ws.state().processing.status == "Failed" and ws.state().channels == {}
    assert not sm.calls("CreateTrainingJob")

    # a waited shard whose job fails: one line, nothing recorded as channels
    box["status"] = "Failed"
    out = cli("shard", *BASE, "--workdir", tmp_path)
    assert out.exit_code == 1 and "ended Failed" in out.stderr and ws.state().channels == {}


def test_processing_and_transform_jobs_stop_like_training_jobs(sm, tmp_path, cli, monkeypatch):
    """`stop` with and without --job, Ctrl-C during a waited shard, and cleanup: StopProcessingJob and
    StopTransformJob with the parameter the API reference names."""
    import sagemaker.processing

    from bincount.backends.sagemaker import processing
    from bincount.state import SageMakerTransform

    ws = _splits(tmp_path)
    box = {"status": "InProgress"}
    processing_status(monkeypatch, box)
    stops = stop_requests(monkeypatch)
    assert cli("shard", *BASE, "--workdir", tmp_path, "--no-wait").exit_code == 0
    job = ws.state().processing.job
    stop = ("stop", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--yes", "--json")
    out = cli(*stop)
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["stopped"] == [f"processing job {job}"]
    assert stops == [("StopProcessingJob", {"ProcessingJobName": job})]

    # a transform job, recorded or named
    import boto3

    client = boto3.client("sagemaker", region_name="us-east-1")
    client.create_model(ModelName="m", ExecutionRoleArn=ROLE, PrimaryContainer={"Image": "x"})
    client.create_transform_job(TransformJobName="bincount-audit-1", ModelName="m",
                                TransformInput={"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix",
                                                                                "S3Uri": f"s3://{BUCKET}/in"}}},
                                TransformOutput={"S3OutputPath": f"s3://{BUCKET}/out"},
                                TransformResources={"InstanceType": "ml.m5.large", "InstanceCount": 1})
    from moto.sagemaker import models as sm_models

    for backend in sm_models.sagemaker_backends.values():
        for region in backend.values():
            for t in region.transform_jobs.values():
                t.transform_job_status = "InProgress"
    ws.update_state(transform=SageMakerTransform(
        job="bincount-audit-1", status="InProgress", model_name="m", model_data=f"s3://{BUCKET}/m.tar.gz",
        input_manifest=f"s3://{BUCKET}/in/m", input_prefix=f"s3://{BUCKET}/in/", input_key_prefix="in/",
        output_path=f"s3://{BUCKET}/out/", bins=1, bins_file="bins.jsonl", source="x", source_digest="d"))
    out = cli(*stop)
    assert json.loads(out.stdout)["stopped"] == ["transform job bincount-audit-1"]
    assert stops[-1] == ("StopTransformJob", {"TransformJobName": "bincount-audit-1"})
    out = cli("stop", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--yes", "--job", "no-such-job")
    assert out.exit_code == 1 and "no SageMaker training, tuning, transform or processing job named no-such-job" in out.stderr

    # Ctrl-C while a shard waits: the job keeps running and billing, and the line says how to stop it
    def interrupted(self, logs=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(sagemaker.processing.ProcessingJob, "wait", interrupted)
    out = cli("shard", *BASE, "--workdir", tmp_path)
    job = ws.state().processing.job
    assert out.exit_code == 130 and "billing" in out.stderr and f"bincount stop --job {job} --yes" in out.stderr

    # cleanup stops it too (after one confirmation), and deletes its code and item lists under s3.prefix
    out = cli("cleanup", "--workdir", tmp_path, "--set", f"s3.bucket={BUCKET}", "--yes", "--json")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    assert f"processing job {job}" in result["stopped"] and stops[-1] == ("StopProcessingJob", {"ProcessingJobName": job})
    assert result["s3_objects"] >= 8 and ws.state().processing is None
    assert processing.ENDED == ("Completed", "Failed", "Stopped")
