"""Shared fixtures: fake AWS credentials, a real local S3 server (moto) and small synthetic data."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on 127.0.0.1 (moto's ThreadedMotoServer); yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no request log lines in the stderr tests read
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    """120 synthetic bins (counts 0..5, 64 px) in the bucket layout, made once per test session."""
    from bincount.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=120, image_size=64, max_count=5, seed=1)
    return out


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
