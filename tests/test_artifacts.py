"""model.tar.gz packaging and safe extraction."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from bincount.artifacts import extract_model, model_dir_from, package_model
from bincount.errors import BincountError
from bincount.state import LocalTraining, SageMakerTraining


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "code").mkdir(parents=True)
    (d / "model.pth").write_bytes(b"weights")
    (d / "meta.json").write_text("{}")
    (d / "code" / "net.py").write_text("# trained copy\n")
    return d


def test_package_layout_and_round_trip(tmp_path):
    tar = package_model(model_dir(tmp_path), tmp_path / "out" / "model.tar.gz")
    with tarfile.open(tar) as t:
        names = sorted(t.getnames())
    assert names == ["code/epochlog.py", "code/inference.py", "code/net.py", "code/requirements.txt",
                     "meta.json", "model.pth"]
    dest = extract_model(tar, tmp_path / "x")
    assert (dest / "code" / "net.py").read_text() == "# trained copy\n"  # the model dir's own copy wins
    assert (dest / "code" / "inference.py").stat().st_size > 0  # missing ones come from container/
    assert "smdebug" not in (dest / "code" / "requirements.txt").read_text()  # serving, not training, needs
    assert model_dir_from(tar, tmp_path / "cache") == model_dir_from(tar, tmp_path / "cache")
    with pytest.raises(BincountError, match="no model.pth"):
        package_model(tmp_path, tmp_path / "bad.tar.gz")


def _tar(tmp_path: Path, add) -> Path:
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for name, data in (("model.pth", b"w"), ("meta.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        add(t)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink"])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, kind):
    def add(t: tarfile.TarFile) -> None:
        info = tarfile.TarInfo({"absolute": "/tmp/evil", "dotdot": "code/../../evil"}.get(kind, "code/link"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "model.pth"
        info.size = 0 if kind in ("symlink", "hardlink") else 4
        t.addfile(info, io.BytesIO(b"evil") if info.size else None)

    with pytest.raises(BincountError, match="unsafe path|link or special file"):
        extract_model(_tar(tmp_path, add), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not (tmp_path.parent / "evil").exists()


def test_not_a_model_archive(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("readme.txt")
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(BincountError, match="missing model.pth, meta.json"):
        extract_model(path, tmp_path / "dest")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(BincountError, match="cannot read") as err:
        extract_model(tmp_path / "junk.tar.gz", tmp_path / "dest")
    assert str(err.value).endswith("(not a tar or tar.gz file)")  # one line, not tarfile's one per method


def test_resolve_model_from_a_dir_an_archive_s3_or_the_state(s3_server, tmp_path):
    from bincount.artifacts import resolve_model
    from bincount.aws import client
    from bincount.config import load_settings
    from bincount.workspace import Workspace

    ws = Workspace(tmp_path / "w")
    settings = load_settings(overrides={"workdir": str(ws.root), "s3.endpoint_url": s3_server,
                                        "deploy.trust_code": True}, environ={})  # its net.py is not ours
    with pytest.raises(BincountError, match="run `bincount train` first"):
        resolve_model(settings)
    with pytest.raises(BincountError, match="or pass --model PATH"):  # deploy.s option
        resolve_model(settings, option="--model")
    src = model_dir(tmp_path)
    assert resolve_model(settings, src) == src.resolve()
    tar = package_model(src, tmp_path / "model.tar.gz")
    unpacked = resolve_model(settings, tar)
    assert unpacked.parent == ws.models.resolve() / "cache" and (unpacked / "code" / "net.py").is_file()
    assert resolve_model(settings, tar) == unpacked  # unpacked once, then reused

    s3 = client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="resolve-model")
    s3.upload_file(str(tar), "resolve-model", "job/output/model.tar.gz")
    ws.update_state(training=SageMakerTraining(job="job", status="Completed",
                                               model_data="s3://resolve-model/job/output/model.tar.gz"))
    assert resolve_model(settings) == unpacked  # same bytes, same cache entry
    ws.update_state(training=LocalTraining(job="run", model_dir=str(src), model_data=str(tar)))
    assert resolve_model(settings) == src.resolve()  # the unpacked dir, while it is there

    with pytest.raises(BincountError, match="cannot download s3://resolve-model/nope"):
        resolve_model(settings, "s3://resolve-model/nope.tar.gz")
    with pytest.raises(BincountError, match="not found"):
        resolve_model(settings, tmp_path / "missing.tar.gz")
    (src / "model.pth").unlink()
    with pytest.raises(BincountError, match="not a model dir"):
        resolve_model(settings, src)


def test_the_training_script_writes_the_same_serving_code_as_the_package():
    from bincount import artifacts
    from bincount.container import train

    # container/ cannot import this package, so train.py keeps its own copy of these two.
    assert train.CODE_FILES == artifacts.SERVING_FILES
    assert train.SERVING_REQUIREMENTS == artifacts.SERVING_REQUIREMENTS


def _trojan(tmp_path: Path) -> Path:
    """A model whose code/inference.py is this version's plus one line that leaves a mark when it runs."""
    from bincount.artifacts import write_model_dir

    model = write_model_dir(tmp_path / "trojan", "mobilenet_v3_small")
    inference = model / "code" / "inference.py"
    mark = tmp_path / "it-ran"
    inference.write_text(inference.read_text() + f"\nopen({str(mark)!r}, 'w').close()\n")
    return package_model(model, tmp_path / "trojan.tar.gz")


def test_an_artifacts_own_code_runs_only_when_identical_or_trusted(cli, one_line_error, tmp_path):
    from PIL import Image

    from bincount.artifacts import write_model_dir

    tar, image = _trojan(tmp_path), tmp_path / "bin.jpg"
    Image.new("RGB", (32, 32)).save(image)
    work, manifest = tmp_path / "w", tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "1", "count": 1, "image": str(image)}) + "\n")
    one_line_error(cli("predict", "--workdir", work, "--model", tar, image), "inference.py", "deploy.trust_code=true")
    one_line_error(cli("evaluate", "--workdir", work, "--model", tar, "--manifest", manifest), "inference.py")
    one_line_error(cli("audit", "--workdir", work, "--model", tar, "--manifest", manifest), "inference.py")
    one_line_error(cli("serve", "--workdir", work, "--model", tar, "--port", "0"), "inference.py")
    assert not (tmp_path / "it-ran").exists()

    res = cli("predict", "--workdir", work, "--model", tar, image, "--set", "deploy.trust_code=true", "--json")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "it-ran").exists()  # trusted: its code ran, as it would on SageMaker

    ours = write_model_dir(tmp_path / "ours", "mobilenet_v3_small")
    assert cli("predict", "--workdir", work, "--model", ours, image).exit_code == 0  # byte-identical code: fine
    (ours / "code" / "sagemaker_inference").mkdir()  # anything else in code/ could shadow an import
    one_line_error(cli("predict", "--workdir", work, "--model", ours, image), "sagemaker_inference")


def test_archive_size_caps_are_checked_before_anything_is_written(tmp_path, monkeypatch):
    from bincount import artifacts

    def archive(name: str, members: dict[str, int]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as t:
            for member, size in members.items():
                info = tarfile.TarInfo(member)
                info.size = size
                t.addfile(info, io.BytesIO(bytes(size)))
        return path

    monkeypatch.setattr(artifacts, "MAX_TOTAL_BYTES", 3 << 20)
    monkeypatch.setattr(artifacts, "MAX_MEMBER_BYTES", 2 << 20)
    cases = {
        "would expand to 4,194,304 bytes": {"model.pth": 2 << 20, "meta.json": 2 << 20},  # 2 files, 4 MiB in all
        "over the 2,097,152 byte limit per file": {"model.pth": 3 << 20, "meta.json": 2},
        "over 64 files": {"model.pth": 1, "meta.json": 2, **{f"code/f{i}.py": 1 for i in range(70)}},
    }
    for message, members in cases.items():
        with pytest.raises(BincountError, match=message):
            extract_model(archive("big.tar.gz", members), tmp_path / "dest")
        assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest.*"))
