"""One model.tar.gz, served three ways with the same code/inference.py, gives the same answers.

- real-time: the local endpoint (`bincount deploy`: GET /ping, POST /invocations over HTTP);
- Batch Transform: each image object is one request (SplitType None, Content-Type image/jpeg) through
  sagemaker-inference's Transformer, the handler chain the transform container runs; the response
  body is what lands in <object>.out, and `audit --backend sagemaker` parses exactly that;
- serverless: the same container contract as real-time; what differs is the host: no GPU, memory
  deploy.memory_size_mb (1024..6144 MB), requests up to 4 MB (6 MB real-time) and 60 s. So it is
  served here by the toolkit chain in a fresh CPU-only process (CUDA hidden), whose peak memory must
  fit the configured serverless memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bincount.artifacts import extract_model, package_model, write_model_dir

HARNESS = Path(__file__).with_name("transform_harness.py")


def _load_harness():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bincount_transform_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory, synth_source) -> dict:
    """model.tar.gz (random mobilenet at 32 px), unpacked as SageMaker unpacks it to /opt/ml/model, and 4 bins."""
    root = tmp_path_factory.mktemp("modes")
    tar = package_model(write_model_dir(root / "model", "mobilenet_v3_small", 32), root / "model.tar.gz")
    images = sorted((synth_source / "bin-images").glob("*.jpg"))[:4]
    return {"tar": tar, "model_dir": extract_model(tar, root / "opt-ml-model"), "images": images, "root": root}


@pytest.fixture(scope="module")
def realtime(served) -> dict[str, dict]:
    from bincount.config import load_settings
    from bincount.predict import HttpTarget
    from bincount.backends.local.endpoint import deploy_local, undeploy_local

    settings = load_settings(overrides={"workdir": str(served["root"] / "work"), "deploy.port": 0,
                                        "deploy.model_data": str(served["tar"])})
    endpoint = deploy_local(settings)
    try:
        http = HttpTarget(endpoint.url)
        return {p.name: http.predict(p.read_bytes(), "image/jpeg") for p in served["images"]}
    finally:
        undeploy_local(settings, yes=True)


def _same(a: dict, b: dict) -> None:
    assert a["count"] == b["count"]
    assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    assert a["probabilities"].keys() == b["probabilities"].keys()


def test_batch_transform_requests_answer_like_the_realtime_endpoint(served, realtime):
    container = _load_harness().Container(served["model_dir"])
    try:
        for path in served["images"]:
            status, content_type, body = container.invoke(path.read_bytes(), "image/jpeg")
            assert (status, content_type) == (200, "application/json")
            _same(json.loads(body), realtime[path.name])  # the .out of this object
        status, _, body = container.invoke(b"\xff\xd8 truncated", "image/jpeg")
        assert status == 400 and "not an image" in body  # a bad object: a 4xx, the job lists it as failed
        status, _, body = container.invoke(served["images"][0].read_bytes(), "image/tiff")
        assert status == 415 and "unsupported content type" in body
        # (the toolkit decodes text/csv and JSON bodies as UTF-8 before input_fn sees them: image bytes
        # sent as text/csv are a 500 from the toolkit itself; the transform job always sends image/jpeg)
        batch = json.dumps({"instances": [__import__("base64").b64encode(p.read_bytes()).decode()
                                          for p in served["images"][:2]]}).encode()
        status, _, body = container.invoke(batch, "application/json")  # the JSON batch form, decoded to str first
        assert status == 200
        for path, answer in zip(served["images"], json.loads(body)):
            _same(answer, realtime[path.name])
    finally:
        container.close()


def test_serverless_host_cpu_only_within_its_memory(served, realtime):
    from bincount.config import DeploySettings

    memory_mb = DeploySettings().memory_size_mb
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(HARNESS), str(served["model_dir"]), *map(str, served["images"])],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    *answers, peak_mib = run.stdout.strip().splitlines()
    for path, line in zip(served["images"], answers):
        reply = json.loads(line)
        assert reply["status"] == 200
        _same(json.loads(reply["body"]), realtime[path.name])
    assert float(peak_mib) < memory_mb
    assert all(p.stat().st_size < 4 * 1024 * 1024 for p in served["images"])  # serverless takes requests up to 4 MB
