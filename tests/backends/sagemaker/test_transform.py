"""`audit --backend sagemaker`: the CreateModel / CreateTransformJob requests (moto captures them) and the join
of the job's outputs, seeded as a transform container writes them (one <name>.out per image, made by the
artifact's real handlers) into the local S3 server that the join reads over HTTP.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from bincount.artifacts import package_model, write_model_dir

_spec = importlib.util.spec_from_file_location("bincount_test_sagemaker", Path(__file__).with_name("test_sagemaker.py"))
_sagemaker_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sagemaker_tests)
sm = _sagemaker_tests.sm  # the moto SageMaker fixture with request capture (shared, not copied)
BUCKET, ROLE = _sagemaker_tests.BUCKET, _sagemaker_tests.ROLE


@pytest.fixture(scope="module")
def s3_server():
    """This module's S3 server runs in this process (not conftest's own process): it serves the same moto
    backends as the in-process mock_aws of `sm`, so the bucket the SageMaker side made is the one read over HTTP."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log lines in the stderr tests read
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield "http://127.0.0.1:%d" % server.get_host_and_port()[1]
    server.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    """A model dir (random mobilenet, 32 px) and its model.tar.gz."""
    root = tmp_path_factory.mktemp("artifact")
    model_dir = write_model_dir(root / "model", "mobilenet_v3_small", 32)
    return model_dir, package_model(model_dir, root / "model.tar.gz")


@pytest.fixture
def warehouse(sm, s3_server, synth_source) -> list[str]:
    """8 bins in the bucket layout under s3://<BUCKET>/wh/ (bin-images/ + metadata/), in the local S3 server."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    ids = []
    for path in sorted((synth_source / "bin-images").glob("*.jpg"))[:8]:
        s3.put_object(Bucket=BUCKET, Key=f"wh/bin-images/{path.name}", Body=path.read_bytes())
        s3.put_object(Bucket=BUCKET, Key=f"wh/metadata/{path.stem}.json",
                      Body=(synth_source / "metadata" / f"{path.stem}.json").read_bytes())
        ids.append(path.stem)
    return ids


def _args(tmp_path, s3_server, artifact, *extra):
    return ["audit", "--backend", "sagemaker", "-w", tmp_path, "--set", f"s3.bucket={BUCKET}",
            "--set", f"sagemaker.role={ROLE}", "--set", f"s3.endpoint_url={s3_server}",
            "--set", f"deploy.model_data={artifact[1]}", *extra]


def _jobs_start_in_progress(monkeypatch):
    """moto's transform jobs are Completed when created; SageMaker's run for minutes. Returns a finisher."""
    from moto.sagemaker import models as sm_models

    real_init = sm_models.FakeTransformJob.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.transform_job_status = "InProgress"

    monkeypatch.setattr(sm_models.FakeTransformJob, "__init__", init)

    def finish(job: str) -> None:
        sm_models.sagemaker_backends["123456789012"]["us-east-1"].transform_jobs[job].transform_job_status = "Completed"

    return finish


def test_transform_request_no_wait_then_collect_joins_outputs(cli, sm, s3_server, warehouse, artifact, tmp_path,
                                                              synth_source, monkeypatch):
    import boto3

    from bincount.handlers import Handlers
    from bincount.workspace import Workspace

    finish = _jobs_start_in_progress(monkeypatch)
    res = cli(*_args(tmp_path, s3_server, artifact, "--source", f"s3://{BUCKET}/wh", "--no-wait", "--json",
                     "--set", "transform.instance_type=ml.c5.xlarge", "--set", "transform.instance_count=2",
                     "--set", "transform.max_concurrent_transforms=4", "--set", "transform.max_payload_mb=10",
                     "--set", "transform.invocation_timeout_s=120"))
    assert res.exit_code == 0, res.stderr
    started = json.loads(res.stdout)
    job = started["job"]
    assert started["status"] == "InProgress" and "--collect" in started["note"]

    # CreateModel: the serving container over the artifact, repacked with code/inference.py (as deploy does)
    model = sm.last("CreateModel")
    assert model["ModelName"] == started["model_name"] and model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert "pytorch-inference:2.6.0-cpu-py312" in container["Image"]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert container["ModelDataUrl"].startswith(f"s3://{BUCKET}/") and container["ModelDataUrl"].endswith("model.tar.gz")

    # CreateTransformJob: documented rules (MaxPayloadInMB <= 100, x MaxConcurrentTransforms <= 100; SplitType None)
    req = sm.last("CreateTransformJob")
    assert req["TransformJobName"] == job and req["ModelName"] == started["model_name"]
    assert req["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile",
                                        "S3Uri": f"s3://{BUCKET}/bincount/transform/input/{job}.manifest"}},
        "ContentType": "image/jpeg", "SplitType": "None"}
    assert req["TransformOutput"]["S3OutputPath"] == f"s3://{BUCKET}/bincount/transform/{job}/"
    assert req["TransformOutput"]["Accept"] == "application/json"
    assert req["TransformResources"] == {"InstanceType": "ml.c5.xlarge", "InstanceCount": 2}
    assert req["MaxConcurrentTransforms"] == 4 and req["MaxPayloadInMB"] == 10
    assert req["MaxConcurrentTransforms"] * req["MaxPayloadInMB"] <= 100
    assert req["BatchStrategy"] == "SingleRecord"
    assert req["ModelClientConfig"] == {"InvocationsMaxRetries": 1, "InvocationsTimeoutInSeconds": 120}

    # the manifest object lists exactly the images (not the label files), relative to one prefix
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"bincount/transform/input/{job}.manifest")["Body"].read())
    assert manifest[0] == {"prefix": f"s3://{BUCKET}/wh/bin-images/"}
    assert manifest[1:] == [f"{i}.jpg" for i in warehouse]

    state = Workspace(tmp_path).state().transform
    assert state.job == job and state.bins == 8 and not state.joined and state.status == "InProgress"
    status = cli("status", "-w", tmp_path, "--json")
    assert json.loads(status.stdout)["transform"]["job"] == job

    # what the transform container writes: the real handlers' answer per image; one bin has no output,
    # one has an error body in place of a prediction
    handlers = Handlers(artifact[0])
    answers = {}
    for rid in warehouse:
        if rid == warehouse[2]:
            continue
        body = (synth_source / "bin-images" / f"{rid}.jpg").read_bytes()
        out = handlers.invoke(body, "image/jpeg", "application/json")
        if rid == warehouse[5]:
            out = json.dumps({"error": "image is truncated", "status": 400})
        answers[rid] = json.loads(out)
        s3.put_object(Bucket=BUCKET, Key=f"bincount/transform/{job}/{rid}.jpg.out", Body=out.encode())

    res = cli(*_args(tmp_path, s3_server, artifact, "--collect", "--no-wait", "--json"))
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "InProgress"  # not done yet: nothing joined
    finish(job)
    res = cli(*_args(tmp_path, s3_server, artifact, "--collect", "--json", "--top", "20"))
    assert res.exit_code == 1, res.stderr  # two bins could not be scored
    out = json.loads(res.stdout)
    assert (out["bins"], out["scored"], out["errors"]) == (8, 6, 2)
    assert out["target"] == f"SageMaker Batch Transform job {job} (Completed)"
    with open(tmp_path / "reports" / "audit.csv") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    assert rows[warehouse[2]]["action"] == "error" and rows[warehouse[2]]["error"] == "no output (job Completed)"
    assert rows[warehouse[5]]["action"] == "error" and "image is truncated" in rows[warehouse[5]]["error"]
    for rid, answer in answers.items():
        if rid == warehouse[5]:
            continue
        label = json.loads((synth_source / "metadata" / f"{rid}.json").read_text())
        assert rows[rid]["predicted"] == str(answer["count"]) and rows[rid]["expected"] == str(label["EXPECTED_QUANTITY"])
        assert float(rows[rid]["confidence"]) == pytest.approx(answer["confidence"], abs=1e-6)
    assert Workspace(tmp_path).state().transform.joined is True

    # the next audit starts a new job and reuses the recorded model: no second CreateModel
    creates = len(sm.calls("CreateModel"))
    res = cli(*_args(tmp_path, s3_server, artifact, "--source", f"s3://{BUCKET}/wh", "--no-wait", "--json"))
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["job"] != job and len(sm.calls("CreateModel")) == creates
    assert sm.last("CreateTransformJob")["ModelName"] == started["model_name"]


def test_public_bucket_selection_needs_the_transform_in_its_region(cli, sm, s3_server, artifact, tmp_path):
    """A manifest of public-bucket images (us-east-1) with SageMaker in another region: one clear error, no job."""
    from bincount.workspace import write_jsonl

    manifest = tmp_path / "pick.jsonl"
    write_jsonl(manifest, [{"id": "00004", "count": 2, "image": "s3://aft-vbi-pds/bin-images/00004.jpg"},
                           {"id": "09915", "count": 1, "image": "s3://aft-vbi-pds/bin-images/09915.jpg"}])
    res = cli(*_args(tmp_path, s3_server, artifact, "--source", manifest, "--set", "sagemaker.region=eu-west-1"))
    assert res.exit_code == 1 and "read S3 in their own region" in res.stderr and "us-east-1" in res.stderr
    assert not sm.calls("CreateTransformJob")


def test_local_images_cannot_be_transformed(cli, sm, s3_server, artifact, tmp_path, synth_source):
    res = cli(*_args(tmp_path, s3_server, artifact, "--source", synth_source))
    assert res.exit_code == 1 and "reads S3 only" in res.stderr
    assert not sm.calls("CreateTransformJob")


@pytest.mark.parametrize("sets, message", [
    (["transform.max_payload_mb=101"], "less than or equal to 100"),
    (["transform.max_payload_mb=20", "transform.max_concurrent_transforms=6"], "over SageMaker's 100 MB"),
    (["transform.batch_strategy=Everything"], "SingleRecord"),
])
def test_transform_settings_follow_the_api_rules(cli, tmp_path, sets, message):
    args = ["audit", "--backend", "sagemaker", "-w", tmp_path]
    for item in sets:
        args += ["--set", item]
    res = cli(*args)
    assert res.exit_code == 1 and message in res.stderr


def test_common_prefix_of_keys():
    from bincount.backends.sagemaker.transform import common_prefix

    prefix = None
    for key in ("wh/a/bin-images/1.jpg", "wh/a/bin-images/2.jpg", "wh/b/bin-images/3.jpg"):
        prefix = common_prefix(prefix, key)
    assert prefix == "wh/"
    assert common_prefix("wh/", "x.jpg") == "" and common_prefix(None, "a/b/c.jpg") == "a/b/"


def test_ctrl_c_while_an_audit_waits_says_the_transform_job_bills_on(cli, sm, s3_server, warehouse, artifact, tmp_path,
                                                                      monkeypatch):
    """Issue 20.6: Ctrl-C during a waited Batch Transform leaves it running (no terminal to ask) and prints the
    command that stops it; `bincount stop` then stops it (StopTransformJob, moto answers via the helper)."""
    import importlib.util as iu

    from bincount.backends.sagemaker import transform

    spec = iu.spec_from_file_location("bincount_test_processing", Path(__file__).with_name("test_processing.py"))
    helpers = iu.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    _jobs_start_in_progress(monkeypatch)
    stops = helpers.stop_requests(monkeypatch)

    class Interrupted:  # transform's clock: the first sleep between polls is where Ctrl-C lands
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def sleep(_seconds):
            raise KeyboardInterrupt

    import time

    monkeypatch.setattr(transform, "time", Interrupted())
    res = cli(*_args(tmp_path, s3_server, artifact, "--source", f"s3://{BUCKET}/wh"))
    job = sm.last("CreateTransformJob")["TransformJobName"]
    assert res.exit_code == 130 and stops == []
    assert "billing" in res.stderr and f"bincount stop --job {job} --yes" in res.stderr
    res = cli("stop", "-w", tmp_path, "--set", f"s3.bucket={BUCKET}", "--yes", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["stopped"] == [f"transform job {job}"]
    assert stops == [("StopTransformJob", {"TransformJobName": job})]
