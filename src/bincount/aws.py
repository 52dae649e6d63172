"""boto3 session and client factory: region, endpoint_url, anonymous (unsigned) access."""

from __future__ import annotations

import os
from typing import Any

DEFAULT_REGION = "us-east-1"


def resolve_region(explicit: str | None = None) -> str:
    """The region: an explicit setting > AWS_REGION > AWS_DEFAULT_REGION > the profile's region > us-east-1."""
    if explicit:
        return explicit
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name]
    import boto3
    import botocore.exceptions

    try:
        return boto3.session.Session().region_name or DEFAULT_REGION
    except botocore.exceptions.BotoCoreError:  # e.g. AWS_PROFILE names a profile that does not exist
        return DEFAULT_REGION


def client(
    service: str,
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    unsigned: bool = False,
    max_pool_connections: int = 10,
    max_attempts: int = 8,
    connect_timeout: float = 10,
    read_timeout: float = 60,
) -> Any:
    """A boto3 client with adaptive retries (backoff on throttling and connection errors); region per resolve_region."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(
        region_name=resolve_region(region),
        retries={"mode": "adaptive", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        signature_version=UNSIGNED if unsigned else None,
    )
    return boto3.session.Session().client(service, endpoint_url=endpoint_url or None, config=config)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key/prefix` into (bucket, key prefix without a leading slash)."""
    from bincount.errors import BincountError

    if not uri.startswith("s3://") or len(uri) <= 5:
        raise BincountError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise BincountError(f"not an S3 URI: {uri!r} (no bucket)")
    return bucket, key.strip("/")


def error_code(exc: BaseException) -> str | None:
    """The AWS error code of a botocore ClientError ("NoSuchBucket", "ThrottlingException", "404"), else None."""
    return _error(exc).get("Code") or None


def error_message(exc: BaseException) -> str | None:
    """The message AWS sent with a ClientError, else None."""
    return _error(exc).get("Message") or None


def _error(exc: BaseException) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, dict) else None
    return error if isinstance(error, dict) else {}
