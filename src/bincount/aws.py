"""The one place bincount talks to AWS from: the region rule, the client factory, the S3 client factory.

Two kinds of bucket, one factory (`s3_client`): the *source* bucket (data.source: data.region,
data.endpoint_url, anonymous unless data.unsigned is false) and bincount's own *work* bucket (s3.bucket:
s3.region, else the jobs' region; s3.endpoint_url; signed). One region rule (`resolve_region`): an
explicit setting > AWS_REGION > AWS_DEFAULT_REGION > the profile's region > us-east-1. SageMaker jobs
run in `job_region` (that rule over sagemaker.region), and the work bucket must be there too.
A command that talks to AWS builds one `Aws(settings)` and takes its clients from it (each made once).
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bincount.config import Settings

DEFAULT_REGION = "us-east-1"


def resolve_region(explicit: str | None = None) -> str:
    """The region: an explicit setting > AWS_REGION > AWS_DEFAULT_REGION > the profile's region > us-east-1."""
    return _region(explicit)[0]


def region_source(explicit: str | None = None, setting: str = "sagemaker.region") -> str:
    """Where resolve_region(explicit) took its answer from: `setting`, AWS_REGION, ..., "the default"."""
    return _region(explicit, setting)[1]


def _region(explicit: str | None, setting: str = "setting") -> tuple[str, str]:
    if explicit:
        return explicit, setting
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(name):
            return os.environ[name], name
    import botocore.exceptions

    try:
        profile = session().region_name
    except botocore.exceptions.BotoCoreError:  # e.g. AWS_PROFILE names a profile that does not exist
        profile = None
    return (profile, "the profile") if profile else (DEFAULT_REGION, "the default")


def job_region(settings: Settings) -> str:
    """The SageMaker jobs' and endpoints' region (resolve_region over sagemaker.region).

    s3.region, where set, must be the same: a job reads its channels and writes its output in its own region.
    """
    from bincount.errors import BincountError

    region = resolve_region(settings.sagemaker.region)
    if settings.s3.region and settings.s3.region != region:
        raise BincountError(f"s3.region={settings.s3.region} but the SageMaker jobs run in {region}: "
                            "the bucket must be in the jobs' region; set sagemaker.region and s3.region to one region")
    return region


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
    return session().client(service, endpoint_url=endpoint_url or None, config=config)


_loader: Any = None
_loader_lock = threading.Lock()


def session(region_name: str | None = None) -> Any:
    """A new boto3 Session that shares this process's botocore data loader, so each service model is read and
    parsed once per process rather than once per session (SageMaker's alone is about 0.3 s of JSON)."""
    import boto3
    import botocore.session

    global _loader
    core = botocore.session.Session()
    with _loader_lock:
        if _loader is None:
            _loader = core.get_component("data_loader")  # the first session's: it honours AWS_DATA_PATH
        else:
            core.register_component("data_loader", _loader)
        made = boto3.Session(botocore_session=core, region_name=region_name)
        paths = _loader.search_paths  # boto3 appends its own data folder once per Session: keep one of each
        paths[:] = list(dict.fromkeys(paths))
    return made


def is_source_bucket(settings: Settings, bucket: str) -> bool:
    """Is `bucket` the one data.source names (read with the data settings), rather than the work bucket?"""
    source = settings.data.source
    return source.startswith("s3://") and parse_s3_uri(source)[0] == bucket


def s3_client(settings: Settings, bucket: str | None = None, *, source: bool = False, **options: Any) -> Any:
    """The S3 client for `bucket`: the source bucket's settings (`source`, or `bucket` is data.source's bucket),
    else the work bucket's. `options` go to `client` (max_pool_connections, max_attempts, timeouts)."""
    if source or (bucket is not None and is_source_bucket(settings, bucket)):
        data = settings.data
        return client("s3", region=data.region, endpoint_url=data.endpoint_url, unsigned=data.unsigned, **options)
    s3 = settings.s3
    return client("s3", region=s3.region or settings.sagemaker.region, endpoint_url=s3.endpoint_url, **options)


def bucket_region(s3: Any, bucket: str) -> str:
    """Where a bucket lives (GetBucketLocation answers None for us-east-1 and EU for the oldest eu-west-1)."""
    location = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
    return {"EU": "eu-west-1"}.get(location, location)


class Aws:
    """The AWS side of one command: its regions and its clients, each client made once (thread-safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._clients: dict[Any, Any] = {}
        self._lock = threading.RLock()

    @cached_property
    def region(self) -> str:
        """SageMaker's region for this command (sagemaker.region, else the environment's); unchecked."""
        return resolve_region(self.settings.sagemaker.region)

    @cached_property
    def job_region(self) -> str:
        """The region jobs run in, checked against s3.region (see `job_region`)."""
        return job_region(self.settings)

    def client(self, service: str, **options: Any) -> Any:
        """A client of `service` in `region` (default: self.region)."""
        options.setdefault("region", self.region)
        return self.once((service, *sorted(options.items())), lambda: client(service, **options))

    def s3(self, bucket: str | None = None, *, source: bool = False, **options: Any) -> Any:
        """The S3 client for `bucket` (see `s3_client`): the work bucket unless it is the source bucket."""
        source = source or (bucket is not None and is_source_bucket(self.settings, bucket))
        return self.once(("s3", source, *sorted(options.items())),
                          lambda: s3_client(self.settings, source=source, **options))

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def runtime(self) -> Any:
        """sagemaker-runtime (InvokeEndpoint), few retries: a request a person waits on."""
        return self.client("sagemaker-runtime", max_attempts=3)

    @cached_property
    def boto_session(self) -> Any:
        """A boto3 Session in the jobs' region (what the SageMaker SDK's Session wraps)."""
        return session(self.job_region)

    def once(self, key: Any, make: Any) -> Any:
        """make(), the first time `key` is asked for; the same object after that."""
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make()
            return self._clients[key]


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
