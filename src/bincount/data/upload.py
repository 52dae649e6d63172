"""`bincount upload`: the splits as SageMaker training channels in S3.

Layout: s3://<bucket>/<prefix>/<split>/manifest.jsonl (rows with image = "images/<id>.jpg") and
s3://<bucket>/<prefix>/<split>/images/<id>.jpg. Idempotent: every object carries its sha256 in
its metadata (x-amz-meta-sha256); an object whose size and sha256 match the local file is skipped
(one LIST per split, then a HEAD only for keys whose size matches). Objects under a split that it no
longer lists are counted as `stale` and left alone. Records the channel URIs in state.json.

With shard channels (shard.channels: auto and `bincount shard` built them, or shards), the shard
folders go instead: s3://<bucket>/<prefix>/shards/<split>/<split>-NNNNNN.{tar,json}, recorded with
channel_format "shards" (the sagemaker backend then reads them in FastFile mode).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bincount.aws import error_code
from bincount.config import Settings
from bincount.console import progress
from bincount.errors import BincountError
from bincount.results import Result
from bincount.workspace import SPLITS, Workspace, file_sha256, read_manifest


class UploadResult(Result):
    bucket: str  # the S3 bucket written to (s3.bucket)
    prefix: str  # key prefix in the bucket, without leading or trailing / (empty: none)
    channels: dict[str, str]  # split -> its channel's s3:// URI, as recorded in state.json
    items: dict[str, int]  # split -> items in its channel (shards: the items their sidecars list)
    uploaded: int  # objects sent: images and split manifests, or shard .tar and .json files
    skipped: int  # objects not sent: already in S3 with the same size and sha256
    bytes_uploaded: int  # bytes uploaded to S3
    stale: int  # objects under the channels' prefixes that no split lists now (left in place)


@dataclass
class _Job:
    key: str
    path: Path | None = None
    data: bytes | None = None

    def sha256(self) -> str:
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest()
        return file_sha256(self.path)  # type: ignore[arg-type]

    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size  # type: ignore[union-attr]


def _s3_error(exc: Exception, bucket: str, endpoint: str | None) -> Exception:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = error_code(exc)
        if code == "NoSuchBucket":
            return BincountError(f"bucket {bucket} does not exist (create it, or pick another with --bucket)")
        if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return BincountError(f"s3://{bucket}: {code} (check your AWS credentials and the bucket policy)")
    if isinstance(exc, EndpointConnectionError):
        return BincountError(f"cannot reach {endpoint or 'AWS S3'} (check --endpoint-url and the network)")
    if isinstance(exc, NoCredentialsError):
        return BincountError("no AWS credentials found (upload writes to your bucket, so it needs them)")
    return exc


def _jobs(ws: Workspace, base: str) -> tuple[dict[str, list[_Job]], dict[str, int]]:
    jobs: dict[str, list[_Job]] = {}
    items: dict[str, int] = {}
    for split in SPLITS:
        path = ws.split(split)
        if not path.exists():
            raise BincountError(f"{path} not found: run `bincount split` first")
        rows = read_manifest(path, need=("id", "image"))
        jobs[split], channel_rows = [], []
        for number, row in enumerate(rows, 1):
            if "id" not in row or "image" not in row:
                raise BincountError(f"{path}:{number}: a row needs an id and an image")
            local = Path(row["image"])
            local = local if local.is_absolute() else ws.root / local
            if not local.is_file():
                raise BincountError(f"{local} (listed in {path}) not found: run `bincount fetch` again")
            name = f"images/{row['id']}.jpg"
            jobs[split].append(_Job(f"{base}{split}/{name}", path=local))
            channel = {k: v for k, v in row.items() if k != "label"}
            channel["image"] = name
            channel_rows.append(json.dumps(channel, sort_keys=True) + "\n")
        jobs[split].append(_Job(f"{base}{split}/manifest.jsonl", data="".join(channel_rows).encode()))
        items[split] = len(rows)
    return jobs, items


def _shard_jobs(folders: dict[str, Path], base: str) -> tuple[dict[str, list[_Job]], dict[str, int]]:
    from bincount.container.shards import read_sidecars

    jobs: dict[str, list[_Job]] = {}
    items: dict[str, int] = {}
    for split, folder in folders.items():
        sidecars = read_sidecars(folder)
        jobs[split] = [_Job(f"{base}shards/{split}/{Path(p).name}", path=Path(p))
                       for meta in sidecars for p in (meta["path"], str(Path(meta["path"]).with_suffix(".json")))]
        items[split] = sum(meta["items"] for meta in sidecars)
    return jobs, items


def upload(settings: Settings) -> UploadResult:
    """Upload images and split manifests to s3://<bucket>/<prefix>/{train,val,test}/."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from bincount.aws import s3_client

    s3 = settings.s3
    if not s3.bucket:
        raise BincountError("upload needs a bucket: --bucket NAME, or s3.bucket in the config")
    ws = Workspace(settings.workdir)
    prefix = s3.prefix.strip("/")
    base = f"{prefix}/" if prefix else ""
    from bincount.data.shard import local_shards

    shard_folders = local_shards(settings)
    splits = list(shard_folders) if shard_folders else list(SPLITS)
    channel_base = f"{base}shards/" if shard_folders else base
    jobs, items = _shard_jobs(shard_folders, base) if shard_folders else _jobs(ws, base)
    client = s3_client(settings, max_pool_connections=s3.workers)

    existing: dict[str, int] = {}
    try:
        for split in splits:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"{channel_base}{split}/"):
                existing.update({obj["Key"]: obj["Size"] for obj in page.get("Contents", [])})
    except Exception as exc:
        raise _s3_error(exc, s3.bucket, s3.endpoint_url) from None

    def one(job: _Job) -> int | None:
        """Upload if needed; return the bytes sent, or None when the object is unchanged (skipped)."""
        size, sha = job.size(), job.sha256()
        if existing.get(job.key) == size:
            head = client.head_object(Bucket=s3.bucket, Key=job.key)
            if head.get("Metadata", {}).get("sha256") == sha:
                return None
        content_type = {".jpg": "image/jpeg", ".tar": "application/x-tar", ".json": "application/json"}.get(
            Path(job.key).suffix, "application/jsonlines")

        def put() -> None:
            if job.data is not None:
                client.put_object(Bucket=s3.bucket, Key=job.key, Body=job.data, Metadata={"sha256": sha},
                                  ContentType=content_type)
            else:
                with job.path.open("rb") as fh:  # type: ignore[union-attr]
                    client.put_object(Bucket=s3.bucket, Key=job.key, Body=fh, Metadata={"sha256": sha},
                                      ContentType=content_type)

        put()
        return size

    all_jobs = [job for split in splits for job in jobs[split]]
    uploaded = skipped = sent = 0
    with progress() as bar, ThreadPoolExecutor(max_workers=s3.workers, thread_name_prefix="upload") as pool:
        task = bar.add_task("uploading", total=len(all_jobs))
        futures = [pool.submit(one, job) for job in all_jobs]
        try:
            for future in as_completed(futures):
                try:
                    n = future.result()
                except Exception as exc:
                    raise _s3_error(exc, s3.bucket, s3.endpoint_url) from None
                if n is not None:
                    uploaded, sent = uploaded + 1, sent + n
                else:
                    skipped += 1
                bar.advance(task)
        finally:
            for future in futures:
                future.cancel()

    wanted = {job.key for job in all_jobs}
    stale = sum(1 for key in existing if key not in wanted)
    channels = {split: f"s3://{s3.bucket}/{channel_base}{split}" for split in splits}
    # these channels replace any a shard Processing job was to write (its record would block train)
    ws.update_state(channels=channels, channel_format="shards" if shard_folders else "files", processing=None)
    return UploadResult(bucket=s3.bucket, prefix=prefix, channels=channels, items=items, uploaded=uploaded,
                        skipped=skipped, bytes_uploaded=sent, stale=stale)
