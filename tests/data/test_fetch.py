import hashlib
import json
from pathlib import Path

import pytest

from bincount.data.fetch import fetch
from bincount.errors import BincountError
from bincount.workspace import read_jsonl

from .conftest import ODD_IDS


def ids_of(rows):
    return [r["id"] for r in rows]


def reasons(workdir: Path) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in read_jsonl(workdir / "reports" / "fetch-rejects.jsonl")}


def test_limit_scans_ids_upward_and_writes_contract_rows(make_settings, synth_source, tmp_path):
    settings = make_settings(data__limit=10)
    result = fetch(settings)
    rows = read_jsonl(settings.workdir / "manifest.jsonl")
    assert ids_of(rows) == [f"{i:05d}" for i in range(1, 11)]
    assert result.items == 10 and result.fetched == 10 and result.rejected == 0
    for row in rows:
        image = settings.workdir / row["image"]
        assert row["image"] == f"raw/bin-images/{row['id']}.jpg"
        assert image.read_bytes() == (synth_source / "bin-images" / f"{row['id']}.jpg").read_bytes()
        assert row["bytes"] == image.stat().st_size
        assert row["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
        label = json.loads((settings.workdir / row["label"]).read_text())
        assert row["count"] == label["EXPECTED_QUANTITY"]
    assert not list(settings.workdir.rglob("*.part"))


def test_ids_with_every_kind_of_reject(make_settings):
    settings = make_settings(data__ids="1-3,201-207")
    result = fetch(settings)
    rows = read_jsonl(settings.workdir / "manifest.jsonl")
    assert ids_of(rows) == ["00001", "00002", "00003", ODD_IDS["mismatch"]]
    assert reasons(settings.workdir) == {
        ODD_IDS["bad_json"]: "bad_label", ODD_IDS["missing_image"]: "missing_image",
        ODD_IDS["truncated"]: "bad_image", ODD_IDS["missing_key"]: "missing_key",
        ODD_IDS["out_of_range"]: "count_not_selected", ODD_IDS["missing_label"]: "missing_label"}
    assert result.rejected == 6 and result.rejects["bad_image"] == 1
    notes = read_jsonl(settings.workdir / "reports" / "fetch-notes.jsonl")
    assert [(n["id"], n["reason"]) for n in notes] == [(ODD_IDS["mismatch"], "count_mismatch")]
    mismatch = rows[-1]
    assert mismatch["count"] == 2 and "sum of BIN_FCSKU_DATA quantities 1" in mismatch["note"]
    assert not (settings.workdir / "raw" / "bin-images" / f"{ODD_IDS['truncated']}.jpg").exists()


def test_count_filter(make_settings):
    settings = make_settings(data__ids="1-40", data__counts="1-2")
    result = fetch(settings)
    rows = read_jsonl(settings.workdir / "manifest.jsonl")
    assert rows and {r["count"] for r in rows} == {1, 2}
    assert set(reasons(settings.workdir).values()) == {"count_not_selected"}
    assert result.items + result.rejected == 40
    assert len(list((settings.workdir / "raw" / "bin-images").glob("*.jpg"))) == result.items


def test_balanced_reads_labels_then_fetches_only_the_chosen(make_settings, tmp_path):
    a = make_settings(tmp_path / "a", data__ids="1-60", data__balanced=True, data__limit=12, data__seed=3)
    fetch(a)
    rows = read_jsonl(a.workdir / "manifest.jsonl")
    assert sorted(r["count"] for r in rows) == sorted(list(range(6)) * 2)
    assert len(list((a.workdir / "raw" / "metadata").glob("*.json"))) == 60
    assert len(list((a.workdir / "raw" / "bin-images").glob("*.jpg"))) == 12
    again = make_settings(tmp_path / "b", data__ids="1-60", data__balanced=True, data__limit=12, data__seed=3)
    fetch(again)
    assert read_jsonl(again.workdir / "manifest.jsonl") == rows
    other = make_settings(tmp_path / "c", data__ids="1-60", data__balanced=True, data__limit=12, data__seed=4)
    fetch(other)
    assert ids_of(read_jsonl(other.workdir / "manifest.jsonl")) != ids_of(rows)


def test_balanced_scan_without_ids(make_settings):
    result = fetch(make_settings(data__balanced=True, data__limit=12, data__counts="1-5"))
    assert result.per_count == {c: 2 for c in range(1, 6)}


def test_balanced_replaces_a_bad_image_with_a_spare_of_its_count(make_settings, synth_source):
    from bincount.data.manifest import balanced_pools

    good = [f"{i:05d}" for i in range(1, 121)
            if json.loads((synth_source / "metadata" / f"{i:05d}.json").read_text())["EXPECTED_QUANTITY"] == 1]
    bad = [ODD_IDS["missing_image"], ODD_IDS["truncated"]]  # labelled count 1, image missing / truncated
    seed = next(s for s in range(100) if set(bad) & set(balanced_pools({1: good + bad}, [1], s)[1][:10]))
    settings = make_settings(data__ids="1-120,202,203", data__counts="1", data__balanced=True,
                             data__limit=10, data__seed=seed)
    result = fetch(settings)
    assert result.per_count == {1: 10}
    assert set(reasons(settings.workdir)) & set(bad)


def test_balanced_needs_every_class(make_settings):
    with pytest.raises(BincountError, match="no usable labels with count"):
        fetch(make_settings(data__ids="1-3", data__balanced=True))


def test_capstone_id_file(make_settings, synth_source, tmp_path):
    counts = {f"{i:05d}": json.loads((synth_source / "metadata" / f"{i:05d}.json").read_text())["EXPECTED_QUANTITY"]
              for i in range(1, 31)}
    capstone: dict[str, list[str]] = {}
    for ident, count in counts.items():
        if count:
            capstone.setdefault(str(count), []).append(f"data/metadata/{ident}.json")
    wrong = capstone["1"].pop()  # the list claims this count-1 item has count 5
    capstone.setdefault("5", []).append(wrong)
    path = tmp_path / "capstone.json"
    path.write_text(json.dumps(capstone))
    settings = make_settings(data__id_file=path, data__counts="1-5")
    result = fetch(settings)
    rows = read_jsonl(settings.workdir / "manifest.jsonl")
    assert {r["id"]: r["count"] for r in rows} == {i: c for i, c in counts.items() if c}
    assert result.rejected == 0
    notes = read_jsonl(settings.workdir / "reports" / "fetch-notes.jsonl")
    assert [(n["id"], n["reason"]) for n in notes] == [(wrong.split("/")[-1][:-5], "id_file_count")]


def test_plain_id_file_and_limit(make_settings, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("# a few bins\n7\nbin-images/00004.jpg\n\n00009\nmetadata/00002.json\n")
    settings = make_settings(data__id_file=path, data__limit=3)
    fetch(settings)
    assert ids_of(read_jsonl(settings.workdir / "manifest.jsonl")) == ["00002", "00004", "00007"]


def test_local_folder_source(make_settings, synth_source):
    settings = make_settings(data__source=str(synth_source), data__ids="5-9")
    result = fetch(settings)
    assert result.items == 5 and result.source == str(synth_source)


def test_resume_after_a_crash_fetches_only_what_is_missing(make_settings, count_requests, synth_source):
    calls, fail_after = count_requests
    settings = make_settings(data__ids="1-40", data__workers=4)
    fail_after["images"] = 15
    with pytest.raises(RuntimeError, match="simulated crash"):
        fetch(settings)
    raw = settings.workdir / "raw"
    assert not list(raw.rglob("*.part")) and not (settings.workdir / "manifest.jsonl").exists()
    present = sorted((raw / "bin-images").glob("*.jpg"))
    assert 5 <= len(present) <= 15
    for path in present:  # whatever is under a final name is complete
        assert path.read_bytes() == (synth_source / "bin-images" / path.name).read_bytes()
    # a stale temp file and a half-written file under the final name (not from us) are never trusted
    (raw / "bin-images" / ".00039.jpg.x1.part").write_bytes(b"junk")
    victim = present[0]
    victim.write_bytes(victim.read_bytes()[:300])
    mtimes = {p.name: p.stat().st_mtime_ns for p in present[1:]}

    calls.clear()
    fail_after["images"] = None
    result = fetch(settings)
    image_gets = sorted(k for k in calls if k.startswith("bin-images/"))
    assert len(image_gets) == 40 - len(present) + 1
    assert f"bin-images/{victim.name}" in image_gets
    assert result.present == len(present) - 1 and result.fetched == 40 - len(present) + 1
    assert {p.name: p.stat().st_mtime_ns for p in present[1:]} == mtimes
    assert victim.read_bytes() == (synth_source / "bin-images" / victim.name).read_bytes()
    assert not list(raw.rglob("*.part"))
    assert len(read_jsonl(settings.workdir / "manifest.jsonl")) == 40

    calls.clear()  # a third run trusts the manifest: no requests at all
    result = fetch(settings)
    assert calls == [] and result.present == 40 and result.fetched == 0


def test_missing_bucket_and_no_selection_are_clear_errors(make_settings, s3_server):
    with pytest.raises(BincountError, match="NoSuchBucket"):
        fetch(make_settings(data__source="s3://no-such-bucket", data__ids="1"))
    with pytest.raises(BincountError, match="say what to fetch"):
        fetch(make_settings())
    with pytest.raises(BincountError, match="no usable items"):
        fetch(make_settings(data__ids="500-505"))


def test_fetch_cli_json_and_errors(cli, s3_server, abid_bucket, tmp_path):
    res = cli("fetch", "--source", abid_bucket, "--endpoint-url", s3_server, "--ids", "1-6", "--workers", "4",
              "--workdir", tmp_path, "--json")
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["items"] == 6 and data["fetched"] == 6
    res = cli("fetch", "--source", str(tmp_path / "nowhere"), "--limit", "3", "--workdir", tmp_path)
    assert res.exit_code == 1 and "neither an s3://" in res.stderr and "Traceback" not in res.stderr
    res = cli("fetch", "--source", abid_bucket, "--endpoint-url", "http://127.0.0.1:9", "--ids", "1",
              "--set", "data.retries=1", "--workdir", tmp_path / "fresh")
    assert res.exit_code == 1 and "cannot reach" in res.stderr


def test_benchmark_script_runs_small():
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "fetch.py"
    spec = importlib.util.spec_from_file_location("bench_fetch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--items", "12", "--small", "6", "--latency-ms", "1", "--repeat", "1", "--image-size", "64",
                       "--loaded", "0"])  # the under-load rows: tests/benchmarks/test_measure.py (index)
    assert out["name"] == "fetch" and out["goal"] == 0.8 and out["ratio"] > 0 and out["s5cmd_s"] > 0
    assert out["peak_mib"]["fetch_large"] > 0 and out["rows"][0]["name"] == "fetch: bincount / s5cmd throughput, idle"


# -- hostile input and faults: one-line errors, nothing lost --------------------------------------
def test_huge_id_range_is_not_materialised(cli, make_settings, tmp_path):
    import time

    started = time.perf_counter()
    res = cli("config", "--json", "--workdir", tmp_path, "--set", "data.ids=1-100000000")
    assert res.exit_code == 0, res.stderr
    assert time.perf_counter() - started < 10  # was over a minute and 2.3 GB
    with pytest.raises(BincountError, match="100,000,000 ids"):
        fetch(make_settings(data__ids="1-100000000"))
    settings = make_settings(data__ids="1-100000000", data__limit=3)  # with --limit it stops once enough
    assert fetch(settings).items == 3


def test_a_label_nested_too_deeply_is_rejected_also_when_cached(make_settings):
    settings = make_settings(data__ids="1-3")
    fetch(settings)
    label = settings.workdir / "raw" / "metadata" / "00002.json"
    label.write_text("[" * 30000 + "]" * 30000)  # cached: read locally on the rerun, not from the source
    from bincount.data import manifest as mf

    with pytest.raises(mf.LabelError, match="nested too deeply"):
        mf.parse_label(label.read_bytes())
    result = fetch(settings)  # the damaged cache is read again from the source
    assert result.items == 3


@pytest.mark.parametrize("ident, side, why", [
    # over the pixel limit: refused from the header, before decoding
    ("00301", 12000, "pixel limit"),
    # 633 bytes claiming 5000x5000 (under the pixel limit) decode to grey rows without an error: refused as a bad
    # image because its scan data cannot fill the frame (issue 22.14)
    ("00302", 5000, "bytes of image data"),
])
def test_a_tiny_jpeg_claiming_a_big_frame_is_not_a_usable_bin(make_settings, s3_server, abid_bucket, ident, side, why):
    import io

    from PIL import Image

    from .conftest import s3

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # the frame header: height and width, big-endian, after length and precision
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    client = s3(s3_server)
    keys = [f"metadata/{ident}.json", f"bin-images/{ident}.jpg"]
    client.put_object(Bucket="abid-test", Key=keys[0], Body=b'{"EXPECTED_QUANTITY": 1}')
    client.put_object(Bucket="abid-test", Key=keys[1], Body=bytes(data))
    try:
        settings = make_settings(data__ids=f"1,{int(ident)}")
        result = fetch(settings)
    finally:  # the bucket is shared by the session: leave it as the other tests (index: 127 bins) expect it
        client.delete_objects(Bucket="abid-test", Delete={"Objects": [{"Key": key} for key in keys]})
    assert result.items == 1 and reasons(settings.workdir) == {ident: "bad_image"}
    detail = read_jsonl(settings.workdir / "reports" / "fetch-rejects.jsonl")[0]["detail"]
    assert f"{side}x{side}" in detail and why in detail, detail


def test_a_corrupt_image_of_the_right_size_is_not_trusted_on_resume(make_settings, synth_source):
    settings = make_settings(data__ids="1-4")
    fetch(settings)
    image = settings.workdir / "raw" / "bin-images" / "00003.jpg"
    original = image.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2:len(damaged) // 2 + 64] = bytes(64)  # same size, other bytes (may still decode)
    image.write_bytes(bytes(damaged))
    result = fetch(settings)
    assert result.fetched == 1 and result.present == 3
    assert image.read_bytes() == original
    row = {r["id"]: r for r in read_jsonl(settings.workdir / "manifest.jsonl")}["00003"]
    assert row["sha256"] == hashlib.sha256(original).hexdigest()


def test_a_locally_edited_label_is_not_trusted_on_resume(make_settings, synth_source):
    """Labels are re-checked on resume as images are (issue 22.3): an edited label (still valid JSON, another
    count) is read from the source again, and the manifest keeps the source's count."""
    settings = make_settings(data__ids="1-4")
    fetch(settings)
    label = settings.workdir / "raw" / "metadata" / "00002.json"
    original = label.read_bytes()
    edited = json.loads(original)
    edited["EXPECTED_QUANTITY"] = (edited["EXPECTED_QUANTITY"] + 1) % 6
    edited["BIN_FCSKU_DATA"] = {}
    label.write_text(json.dumps(edited))
    fetch(settings)
    assert label.read_bytes() == original
    row = {r["id"]: r for r in read_jsonl(settings.workdir / "manifest.jsonl")}["00002"]
    assert row["count"] == json.loads(original)["EXPECTED_QUANTITY"]
    assert row["label_sha256"] == hashlib.sha256(original).hexdigest()


def test_a_full_disk_stops_fetch_with_one_line_and_keeps_the_manifest(cli, one_line_error, abid_bucket, s3_server,
                                                                      monkeypatch, tmp_path):
    import errno
    import os

    from bincount import workspace as workspace_module

    workdir = tmp_path / "work"
    first = cli("fetch", "--workdir", workdir, "--source", abid_bucket, "--endpoint-url", s3_server, "--limit", "3")
    assert first.exit_code == 0, first.stderr
    manifest = (workdir / "manifest.jsonl").read_bytes()
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    class FullDiskOs:  # the atomic writers' `os` (workspace.py), whose files cannot be written to
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fdopen(fd, *args, **kwargs):
            return FullDisk(real_fdopen(fd, *args, **kwargs))

    monkeypatch.setattr(workspace_module, "os", FullDiskOs())
    res = cli("fetch", "--workdir", workdir, "--source", abid_bucket, "--endpoint-url", s3_server, "--limit", "20")
    one_line_error(res, "No space left on device", "run the same command again")
    assert (workdir / "manifest.jsonl").read_bytes() == manifest
    assert not list(workdir.rglob("*.part"))


def test_an_unresponsive_endpoint_fails_fast_with_a_hint(cli, one_line_error, tmp_path):
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept_and_say_nothing():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        started = time.perf_counter()
        res = cli("fetch", "--workdir", tmp_path, "--source", "s3://abid", "--ids", "1-4", "--workers", "2",
                  "--endpoint-url", f"http://127.0.0.1:{server.getsockname()[1]}", "--set", "data.timeout=0.5")
        took = time.perf_counter() - started
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    one_line_error(res, "has not answered", "data.timeout")
    assert took < 20


def test_bad_endpoint_url_and_non_utf8_id_file_are_one_line(cli, one_line_error, tmp_path):
    one_line_error(cli("fetch", "--workdir", tmp_path, "--ids", "1-3", "--endpoint-url", "notaurl"), "data.endpoint_url")
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"00001\n\xff\xfe\x00bad\n")
    one_line_error(cli("fetch", "--workdir", tmp_path, "--id-file", ids, "--source", str(tmp_path)), "not UTF-8")
    ids.write_text("[" * 30000)
    one_line_error(cli("fetch", "--workdir", tmp_path, "--id-file", ids, "--source", str(tmp_path)), "nested too deeply")


def test_a_small_limit_keeps_few_requests_in_flight(make_settings, count_requests):
    """256 requests in flight by default: a scan for --limit 3 would have started hundreds of GETs before it
    stopped; in flight stays at max(8, limit), so at most 2 x 8 ids are tried past the first usable ones."""
    calls, _ = count_requests
    result = fetch(make_settings(data__workers=None, data__limit=3))
    labels = [k for k in calls if k.startswith("metadata/")]
    assert result.items == 3 and len(labels) <= 3 + 2 * 8


def test_a_body_is_kept_for_inspection_only_up_to_its_cap_and_afresh_on_a_reread():
    """fetch inspects an image from the bytes it streamed; a bigger body is read back from disk instead, so
    256 requests in flight hold at most 256 x KEEP_BYTES whatever a bucket serves."""
    from bincount.data.fetch import _keep

    kept: list[bytes] = []
    assert b"".join(_keep(iter([b"a" * 10, b"b" * 10]), kept, limit=25)) == b"a" * 10 + b"b" * 10
    assert kept == [b"a" * 10, b"b" * 10]
    assert b"".join(_keep(iter([b"c" * 10]), kept, limit=25)) == b"c" * 10 and kept == [b"c" * 10]  # a re-read
    assert b"".join(_keep(iter([b"a" * 10, b"b" * 10, b"c" * 10]), kept, limit=25)) == b"a" * 10 + b"b" * 10 + b"c" * 10
    assert kept == []
