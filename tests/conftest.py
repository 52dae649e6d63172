"""Shared fixtures: fake AWS credentials, a real local S3 server (moto) and small synthetic data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

# Under pytest-xdist (make test: -n auto) each worker, and every process its tests start (train.py, the server,
# the training toolkit), gets its share of the cores for torch's threads: set before anything imports torch.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0):
    _threads = max(1, len(os.sched_getaffinity(0)) // _workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)

# Never reach real AWS from tests: fake credentials, a fixed region, no SDK telemetry.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
})
for _name in [n for n in os.environ if n.startswith("BINCOUNT_")]:
    del os.environ[_name]


@pytest.fixture(scope="session", autouse=True)
def default_boto3_sessions_share_one_loader():
    """moto's mock_aws sets boto3.DEFAULT_SESSION to None, so every test that uses it makes a new default
    session (the SDK's Estimator and the tests' own boto3.client calls) and re-parses each service model: let
    those sessions share bincount's loader (aws.session), as a user's one default session per process does."""
    import boto3

    from bincount import aws

    boto3.setup_default_session = lambda **kw: setattr(boto3, "DEFAULT_SESSION", aws.session(**kw))


MOTO_SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log lines in the stderr tests read
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks the port
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test session ends (closes our stdin, or dies)
server.stop()
"""


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on 127.0.0.1 (moto's ThreadedMotoServer) in its own process; yields its URL.
    Its own process: the in-process mock_aws of the SageMaker tests resets moto's backends in this process,
    and must not empty the buckets that other tests of the same xdist worker keep on this server."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", MOTO_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = proc.stdout.readline().strip()
    assert port.isdigit(), f"the moto server did not start (exit {proc.poll()})"
    yield f"http://127.0.0.1:{port}"
    proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    """120 synthetic bins (counts 0..5, 64 px) in the bucket layout, made once per test session."""
    from bincount.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=120, image_size=64, max_count=5, seed=1)
    return out


def make_workdir(synth_source: Path, root: Path) -> Path:
    """A workdir as fetch + split leave it: raw/, manifest.jsonl, splits/{train,val,test}.jsonl (72/24/24)."""
    from bincount.workspace import Workspace, write_jsonl

    shutil.copytree(synth_source, root / "raw")
    rows = []
    for label in sorted((root / "raw" / "metadata").glob("*.json")):
        data = (root / "raw" / "bin-images" / f"{label.stem}.jpg").read_bytes()
        rows.append({"id": label.stem, "count": json.loads(label.read_text())["EXPECTED_QUANTITY"],
                     "image": f"raw/bin-images/{label.stem}.jpg", "label": f"raw/metadata/{label.name}",
                     "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    ws = Workspace(root)
    write_jsonl(ws.manifest, rows)
    write_jsonl(ws.split("train"), rows[:72])
    write_jsonl(ws.split("val"), rows[72:96])
    write_jsonl(ws.split("test"), rows[96:])
    return root


@pytest.fixture
def splits_workdir(synth_source):
    """splits_workdir(root) -> a fresh workdir with raw/, the manifest and the three splits (see make_workdir)."""
    return lambda root: make_workdir(synth_source, root)


@contextmanager
def _exclusive(path: Path):
    """An exclusive lock on `path` across processes (the xdist workers of one run)."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def trained_run(synth_source, tmp_path_factory) -> SimpleNamespace:
    """One `bincount train` per pytest run (the local backend: train.py in its own process as SageMaker runs
    it, 2 epochs at 32 px, the Debugger hook on); the artifact, serving, evaluate and Debugger tests read it.
    Read-only: a test that writes copies `workdir` first. Under xdist the first worker that needs it trains it
    in the run's shared temp dir, under a lock; the others wait for it and read the same files.
    Fields: workdir, out (the --json result), stderr, run (models/<run>)."""
    from typer.testing import CliRunner

    from bincount.cli import app

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # <basetemp>/popen-gwN: the parent is this run's, common to its workers
    root, done = shared / "trained-run", shared / "trained-run.json"
    with _exclusive(shared / "trained-run.lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a worker that failed half-way
            workdir = make_workdir(synth_source, root)
            args = ["train", "--workdir", workdir, "--json", "--arch", "mobilenet_v3_small", "--image-size", "32",
                    "--epochs", "2", "--batch-size", "32", "--set", "train.warmup_epochs=0"]
            res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
            assert res.exit_code == 0, res.stderr
            done.with_suffix(".tmp").write_text(json.dumps({"stdout": res.stdout, "stderr": res.stderr}))
            done.with_suffix(".tmp").replace(done)
    saved = json.loads(done.read_text())
    out = json.loads(saved["stdout"])
    return SimpleNamespace(workdir=root, out=out, stderr=saved["stderr"], run=root / "models" / out["run"])


@pytest.fixture
def cli():
    """Invoke the CLI in-process: cli("fetch", "--limit", "3") -> click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from bincount.cli import app

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)

    return invoke


@pytest.fixture
def one_line_error():
    """check(res, *fragments): the CLI failed (exit 1) with exactly one `error: ...` line holding every
    fragment, as the last line of stderr (progress bars may come before it), and no traceback."""

    def check(res, *fragments: str, code: int = 1) -> str:
        assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert "Traceback" not in res.stderr and lines, res.stderr
        errors = [line for line in lines if line.startswith("error:")]
        assert errors == [lines[-1]], res.stderr
        for fragment in fragments:
            assert fragment in errors[0], (fragment, errors[0])
        return errors[0]

    return check


@pytest.fixture
def captured_sagemaker_requests(monkeypatch) -> list[tuple[str, dict]]:
    """A list that fills with (operation, params) of every SageMaker request the SDK sessions send."""
    import json

    from bincount.backends.sagemaker import jobs

    requests: list[tuple[str, dict]] = []
    real_session = jobs.session

    def capturing_session(aws):
        session = real_session(aws)

        def capture(params, model, **_):
            requests.append((model.name, json.loads(json.dumps(params, default=str))))

        session.sagemaker_client.meta.events.register("provide-client-params.sagemaker", capture)
        return session

    monkeypatch.setattr(jobs, "session", capturing_session)
    return requests


@pytest.fixture
def sagemaker_requests(monkeypatch, captured_sagemaker_requests):
    """moto's SageMaker and S3 in-process with the bucket `bincount-test`; yields the list of (operation,
    params) of every SageMaker request the CLI sends (what reaches the API, after the SDK built it)."""
    from bincount.backends.sagemaker import jobs

    jobs.load_sdk()
    import boto3
    import sagemaker.telemetry.telemetry_logging as telemetry
    from moto import mock_aws

    monkeypatch.setattr(telemetry, "_requests_helper", lambda url, timeout: None)  # never leave the machine
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bincount-test")
        yield captured_sagemaker_requests
