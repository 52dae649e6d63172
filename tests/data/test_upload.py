import json

import pytest

from bincount.config import load_settings
from bincount.data.fetch import fetch
from bincount.data.split import split
from bincount.data.upload import upload
from bincount.errors import BincountError
from bincount.workspace import Workspace, read_jsonl

from .conftest import s3


@pytest.fixture
def channels_bucket(s3_server):
    import uuid

    name = f"channels-{uuid.uuid4().hex[:8]}"
    s3(s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def split_workdir(tmp_path, synth_source):
    settings = load_settings(overrides={"workdir": tmp_path, "data.source": str(synth_source), "data.ids": "1-30"},
                             environ={})
    fetch(settings)
    split(settings)
    return tmp_path


def settings_for(workdir, bucket, endpoint, **extra):
    return load_settings(overrides={"workdir": workdir, "s3.bucket": bucket, "s3.endpoint_url": endpoint,
                                    "s3.prefix": "run1", **extra}, environ={})


def test_upload_lays_out_channels_and_is_idempotent(split_workdir, channels_bucket, s3_server):
    settings = settings_for(split_workdir, channels_bucket, s3_server)
    result = upload(settings)
    assert result.uploaded == 30 + 3 and result.skipped == 0 and sum(result.items.values()) == 30
    client = s3(s3_server)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=channels_bucket)["Contents"]}
    for name in ("train", "val", "test"):
        rows = read_jsonl(split_workdir / "splits" / f"{name}.jsonl")
        body = client.get_object(Bucket=channels_bucket, Key=f"run1/{name}/manifest.jsonl")["Body"].read()
        channel = [json.loads(line) for line in body.decode().splitlines()]
        assert [r["image"] for r in channel] == [f"images/{r['id']}.jpg" for r in rows]
        assert [r["count"] for r in channel] == [r["count"] for r in rows]
        for row in rows:
            key = f"run1/{name}/images/{row['id']}.jpg"
            assert key in keys
            head = client.head_object(Bucket=channels_bucket, Key=key)
            assert head["Metadata"]["sha256"] == row["sha256"] and head["ContentLength"] == row["bytes"]
    assert Workspace(split_workdir).state().channels == {
        name: f"s3://{channels_bucket}/run1/{name}" for name in ("train", "val", "test")}

    again = upload(settings)
    assert again.uploaded == 0 and again.skipped == 33 and again.bytes_uploaded == 0

    changed = split_workdir / read_jsonl(split_workdir / "splits" / "val.jsonl")[0]["image"]
    changed.write_bytes(changed.read_bytes() + b"\0")  # same key, new content
    third = upload(settings)
    assert third.uploaded == 1 and third.skipped == 32


def test_upload_cli_and_errors(split_workdir, channels_bucket, s3_server, cli, tmp_path):
    res = cli("upload", "--workdir", split_workdir, "--bucket", channels_bucket, "--endpoint-url", s3_server,
              "--prefix", "", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["channels"]["train"] == f"s3://{channels_bucket}/train"
    res = cli("upload", "--workdir", split_workdir)
    assert res.exit_code == 1 and "needs a bucket" in res.stderr
    res = cli("upload", "--workdir", tmp_path / "empty", "--bucket", channels_bucket, "--endpoint-url", s3_server)
    assert res.exit_code == 1 and "run `bincount split` first" in res.stderr
    with pytest.raises(BincountError, match="does not exist"):
        upload(settings_for(split_workdir, "no-such-bucket-here", s3_server))


@pytest.mark.parametrize("bad", ["../../escape", "a/b", "/abs", "..", "x\\\\y", ".hidden"])
def test_an_id_that_would_escape_its_channel_is_refused(split_workdir, channels_bucket, s3_server, cli, bad):
    """An edited split whose id holds / or .. (an S3 key outside the channel) stops upload in one line
    naming the file and line, before anything is sent (issue 22.12)."""
    path = Workspace(split_workdir).split("val")
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    row["id"] = bad
    lines[1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    res = cli("upload", "--workdir", split_workdir, "--bucket", channels_bucket, "--endpoint-url", s3_server)
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}:2: id ") and "not a safe item id" in last, last
    assert "Contents" not in s3(s3_server).list_objects_v2(Bucket=channels_bucket)


def test_a_bad_bucket_name_is_one_line(split_workdir, cli):
    res = cli("upload", "--workdir", split_workdir, "--bucket", "bad name!")
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: invalid setting s3.bucket: 'bad name!' is not an S3 bucket name (3-63 characters: a-z, 0-9, . and -, "
        "a letter or digit first and last) (from --set or a flag)"]
