"""sagemaker-runtime: one image to a SageMaker endpoint (InvokeEndpoint), its JSON answer."""

from __future__ import annotations

import json

from bincount.aws import Aws
from bincount.backends.sagemaker import jobs
from bincount.errors import BincountError


def invoke_endpoint(aws: Aws, endpoint_name: str, body: bytes, content_type: str) -> dict:
    """POST one image to a SageMaker endpoint through sagemaker-runtime; the parsed JSON response."""
    runtime = aws.runtime
    with jobs.aws_errors(f"invoke endpoint {endpoint_name}"):
        response = runtime.invoke_endpoint(EndpointName=endpoint_name, Body=body, ContentType=content_type,
                                           Accept="application/json")
        payload = response["Body"].read()
    try:
        data = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BincountError(f"endpoint {endpoint_name} answered {response.get('ContentType', '?')}, not JSON: "
                            f"{payload[:80]!r}") from None
    if not isinstance(data, dict):
        raise BincountError(f"endpoint {endpoint_name} answered JSON that is not an object: {payload[:80]!r}")
    return data
