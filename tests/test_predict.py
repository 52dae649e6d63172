"""bincount predict: files, folders and s3:// URIs against a model, a local endpoint or a (stubbed) SageMaker one."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from bincount import serve
from bincount.artifacts import write_model_dir
from bincount.handlers import Handlers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of 5 JPEGs (one nested) and a PNG, plus a text file that must be skipped."""
    from PIL import Image

    from bincount.data.synth import synthesize

    synth = tmp_path_factory.mktemp("synth")
    synthesize(synth, n=5, image_size=64, max_count=5, seed=3)
    root = tmp_path_factory.mktemp("images")
    (root / "deeper").mkdir()
    jpgs = sorted((synth / "bin-images").glob("*.jpg"))
    for i, src in enumerate(jpgs):
        shutil.copy(src, (root / "deeper" if i == 4 else root) / src.name)
    Image.open(jpgs[0]).save(root / "as.PNG")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def expected(model_dir, images) -> dict[str, dict]:
    """What the artifact's handlers answer in-process, per file name."""
    handlers = Handlers(model_dir)
    return {p.name: json.loads(handlers.invoke(p.read_bytes(), "image/jpeg"))
            for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".png")}


def _check(items: list[dict], expected: dict[str, dict]) -> None:
    for item in items:
        want = expected[Path(item["image"]).name]
        assert item["count"] == want["count"]
        assert item["confidence"] == pytest.approx(want["confidence"], abs=1e-5)


def test_folder_and_files_with_a_model_as_json(cli, model_dir, images, expected, tmp_path):
    res = cli("predict", images, images / "deeper", "--model", model_dir, "--workdir", tmp_path, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    names = [Path(i["image"]).name for i in out["items"]]
    assert len(names) == 7 and names.count("00005.jpg") == 2  # recursive, and the folder given twice
    assert "notes.txt" not in names and "as.PNG" in names
    assert out["failed"] == 0 and out["target"].startswith("model ")
    _check(out["items"], expected)
    # one output contract: the documented fields only, ending with a newline; -f json is --json
    assert set(out) == {"target", "predicted", "failed", "items"} and res.stdout.endswith("}\n")
    same = cli("predict", images, images / "deeper", "--model", model_dir, "--workdir", tmp_path, "-f", "json")
    assert json.loads(same.stdout) == out
    clash = cli("predict", images, "--model", model_dir, "--workdir", tmp_path, "-f", "csv", "--json")
    assert clash.exit_code == 1 and "--json and --format csv disagree" in clash.stderr and clash.stdout == ""


def test_csv_output_through_a_local_endpoint(cli, model_dir, images, expected, tmp_path):
    with serve.Server(model_dir) as server:
        res = cli("predict", images, "--endpoint", server.url, "--format", "csv", "--workdir", tmp_path)
    assert res.exit_code == 0, res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 6 and list(rows[0]) == ["image", "count", "confidence", "error"]
    _check([{"image": r["image"], "count": int(r["count"]), "confidence": float(r["confidence"])} for r in rows], expected)
    assert all(len(line) > 0 for line in res.stdout.splitlines())  # long paths are not wrapped
    assert res.stdout.endswith("\n") and not res.stdout.endswith("\n\n")


def test_s3_uris_read_through_the_local_s3_server(cli, s3_server, model_dir, images, expected, tmp_path):
    from bincount.aws import client

    s3 = client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="bins")
    for p in sorted(images.glob("*.jpg")):
        s3.put_object(Bucket="bins", Key=f"fresh/{p.name}", Body=p.read_bytes())
    one = sorted(images.glob("*.jpg"))[0].name
    res = cli("predict", "s3://bins/fresh", f"s3://bins/fresh/{one}", "s3://bins/fresh/missing.jpg", "--model", model_dir,
              "--workdir", tmp_path, "--set", f"s3.endpoint_url={s3_server}", "--json")
    assert res.exit_code == 1  # the missing key
    out = json.loads(res.stdout)
    good = [i for i in out["items"] if not i["error"]]
    assert len(good) == 5 and all(i["image"].startswith("s3://bins/fresh/") for i in good)
    _check(good, expected)
    assert [i["image"] for i in out["items"] if i["error"]] == ["s3://bins/fresh/missing.jpg"]


def test_failed_items_are_listed_and_exit_non_zero_while_the_others_come_back(cli, model_dir, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    good = sorted(images.glob("*.jpg"))[0]
    res = cli("predict", good, broken, tmp_path / "nope.jpg", "--model", model_dir, "--workdir", tmp_path, "--json")
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    errors = {Path(i["image"]).name: i["error"] for i in out["items"] if i["error"]}
    assert errors == {"broken.jpg": "body is not an image (expected JPEG, PNG, WEBP, BMP or GIF)", "nope.jpg": "not found"}
    assert out["predicted"] == 1 and out["failed"] == 2
    table = cli("predict", good, broken, "--model", model_dir, "--workdir", tmp_path)
    assert table.exit_code == 1 and "not an image" in table.stdout and "1 predicted, 1 failed" in table.stdout


def test_default_targets_come_from_state(cli, model_dir, images, expected, tmp_path):
    from bincount.state import LocalEndpoint, LocalTraining
    from bincount.workspace import Workspace

    good = str(sorted(images.glob("*.jpg"))[0])
    res = cli("predict", good, "--workdir", tmp_path)
    assert res.exit_code == 1 and "nothing to predict with" in res.stderr
    ws = Workspace(tmp_path)
    ws.update_state(training=LocalTraining(job="run", model_dir=str(model_dir), model_data=str(tmp_path / "m.tar.gz")))
    out = json.loads(cli("predict", good, "--workdir", tmp_path, "--json").stdout)
    assert out["target"] == f"model {model_dir.resolve()}"
    with serve.Server(model_dir) as server:
        ws.update_state(endpoint=LocalEndpoint(url=server.url, pid=0, model_dir=str(model_dir)))
        out = json.loads(cli("predict", good, "--workdir", tmp_path, "--json").stdout)
        assert out["target"] == f"endpoint {server.url}"
        _check(out["items"], expected)
    res = cli("predict", good, "--workdir", tmp_path)
    assert res.exit_code == 1 and "does not answer GET /ping" in res.stderr


def test_an_endpoint_name_goes_to_sagemaker(cli, model_dir, images, expected, tmp_path, monkeypatch):
    """sagemaker-runtime cannot run here: its invoke is stubbed with the same handlers; the routing is real."""
    import bincount.backends.sagemaker.runtime as sm

    handlers = Handlers(model_dir)
    calls = []

    def fake_invoke(settings, endpoint_name, body, content_type):
        calls.append((endpoint_name, content_type))
        return json.loads(handlers.invoke(body, content_type))

    monkeypatch.setattr(sm, "invoke_endpoint", fake_invoke)
    res = cli("predict", images, "--endpoint", "bincount-prod", "--workdir", tmp_path, "--workers", "3", "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["target"] == "SageMaker endpoint bincount-prod"
    _check(out["items"], expected)
    assert {c[0] for c in calls} == {"bincount-prod"} and ("bincount-prod", "image/png") in calls


def test_a_broken_model_is_a_one_line_error(cli, model_dir, images, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.pth").write_bytes(b"not a state dict")
    res = cli("predict", images, "--workdir", tmp_path, "--model", broken)
    assert res.exit_code == 1 and "cannot load the model in" in res.stderr and "Traceback" not in res.stderr


def test_paths_with_markup_characters_are_printed_as_they_are(cli, model_dir, images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: short enough for the 80-column table whatever tmp_path is
    folder = Path("odd[bold][")
    (folder / "]x[").mkdir(parents=True)
    shutil.copy(next(images.glob("*.jpg")), folder / "]x[" / "].jpg")  # the path holds "[/]" and "[bold]"
    missing = "[/]nope.jpg"
    res = cli("predict", "--workdir", tmp_path, "--model", model_dir, folder, missing)
    assert res.exit_code == 1  # the missing one failed; the table is still printed
    assert "Traceback" not in res.stderr
    flat = "".join(res.stdout.split())  # the table may fold long paths across lines
    assert "odd[bold][/]x[/].jpg" in flat and "[/]nope.jpg" in flat and "notfound" in flat


def test_terminal_escape_sequences_in_file_names_and_errors_are_shown_escaped(cli, model_dir, images, tmp_path,
                                                                              monkeypatch):
    """A file named to clear the screen and retitle the terminal: printed as \\x1b..., never raw (issue 22.13)."""
    monkeypatch.setenv("COLUMNS", "500")  # no folding of the long names in the table
    folder = tmp_path / "evil\x1b]0;pwned\x07"
    folder.mkdir()
    shutil.copy(next(images.glob("*.jpg")), folder / "\x1b[2J\x1b[31mred\r\u202egpj.jpg")
    missing = str(tmp_path / "\x1b[5mgone.jpg")
    for fmt in ("table", "csv"):
        res = cli("predict", "--workdir", tmp_path, "--model", model_dir, folder, missing, "--format", fmt)
        assert res.exit_code == 1
        for text in (res.stdout, res.stderr):
            assert not any(c in text for c in "\x1b\x07\r\u202e"), repr(text)
        flat = "".join(res.stdout.split())
        assert "\\x1b[2J\\x1b[31mred" in flat and "\\u202egpj.jpg" in flat and "\\x1b[5mgone.jpg" in flat
    res = cli("predict", images, "--workdir", tmp_path, "--model", tmp_path / "no\x1b[31mmodel")
    assert res.exit_code == 1 and "\x1b" not in res.stderr and "no\\x1b[31mmodel" in res.stderr
    out = json.loads(cli("predict", missing, "--workdir", tmp_path, "--model", model_dir, "--json").stdout)
    assert out["items"][0]["image"] == missing  # JSON keeps the name exact (json escapes it)
