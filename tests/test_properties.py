"""Property tests: generated garbage thrown at every input bincount reads (config files, --set and env
overrides, label JSON, manifests, image bytes). The one property: success, or a one-line error
(BincountError -> `error: ...` on stderr, exit 1), never a traceback, and nothing already on disk lost.

Deterministic (derandomize=True, no example database) and small, so the suite stays fast.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bincount.cli import app
from bincount.config import Settings
from bincount.data import manifest as mf
from bincount.errors import BincountError

FEW = settings(max_examples=25, derandomize=True, database=None, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large, HealthCheck.large_base_example])
FEWER = settings(FEW, max_examples=10)


def _keys(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            out += _keys(annotation, f"{prefix}{name}.")
    return out


KEYS = _keys(Settings)
NAMES = sorted({k.rsplit(".", 1)[-1] for k in KEYS} | {k.split(".")[0] for k in KEYS})

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["inf", ".nan", "-1", "0", "1e999", "s3://", "http://", "[/]", "a\nb", "~"]))
documents = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3)
                         | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=8), kids, max_size=3),
                         max_leaves=12)
deep = st.builds(lambda n, open_, close: open_ * n + close * n, st.sampled_from([50, 2000, 25000]),
                 st.sampled_from(["[", "{a: ", "- "]), st.sampled_from(["]", "}", ""]))


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)


def assert_ok_or_one_line(res) -> None:
    """exit 0, or exit 1 whose stderr ends in exactly one `error: ...` line; never a traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.exit_code in (0, 1), (res.exit_code, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    if res.exit_code == 1 and errors:
        assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr
    assert len(errors) <= 1, res.stderr


# -- settings ----------------------------------------------------------------------------------
@FEW
@given(content=st.binary(max_size=300)
       | documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode())
       | st.dictionaries(st.sampled_from(KEYS[:12]), documents, max_size=4).map(lambda d: yaml.safe_dump(d).encode())
       | deep.map(str.encode))
def test_config_files_of_any_bytes(content: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(content)
        res = run("config", "--json", "--config", path, "--workdir", tmp)
        assert_ok_or_one_line(res)
        if res.exit_code == 0:
            json.loads(res.stdout)
        else:
            assert res.stderr.strip().splitlines()[-1].startswith("error: ")
        assert path.read_bytes() == content  # read, never rewritten


keys = st.sampled_from(KEYS) | st.sampled_from(NAMES) | st.text(max_size=10)
values = st.text(max_size=16) | st.sampled_from(["inf", "nan", "-.inf", "{a: 1}", "[1, 2]", "1e999", "notaurl",
                                                 "null", "~", "", "0-100000000", "[" * 3000])


@FEW
@given(sets=st.lists(st.tuples(keys, values), max_size=4), env=st.dictionaries(keys, values, max_size=3))
def test_set_and_env_overrides_of_any_text(sets, env):
    environ = {}
    for key, value in env.items():
        name = "BINCOUNT_" + key.upper().replace(".", "__")
        if "\x00" not in name + value and "=" not in name:
            environ[name] = value
    args = [arg for key, value in sets for arg in ("--set", f"{key}={value}")]
    res = run("config", "--json", *args, env=environ)
    assert_ok_or_one_line(res)


# -- labels and manifests ----------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                           max_leaves=10)
labels = (st.binary(max_size=200)
          | st.fixed_dictionaries({"EXPECTED_QUANTITY": json_values}, optional={"BIN_FCSKU_DATA": json_values})
          .map(lambda d: json.dumps(d).encode())
          | json_values.map(lambda v: json.dumps(v).encode())
          | deep.map(lambda s: s.replace("{a: ", '{"a": ').encode()))


@FEW
@given(raw=labels)
def test_label_json_gives_a_count_or_a_reject_reason(raw: bytes):
    try:
        label = mf.parse_label(raw)
    except mf.LabelError as exc:
        assert exc.reason in (mf.BAD_LABEL, mf.MISSING_KEY, mf.BAD_COUNT)
    else:
        assert isinstance(label.count, int) and label.count >= 0


rows = st.fixed_dictionaries({}, optional={"id": json_values, "count": json_values, "image": json_values}).map(json.dumps)
manifests = st.lists(rows | st.binary(max_size=40).map(lambda b: b.decode("latin-1")), min_size=0, max_size=6).map(
    lambda lines: "\n".join(lines).encode("utf-8", "surrogateescape")) | st.binary(max_size=200) | deep.map(str.encode)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from bincount.artifacts import write_model_dir

    return write_model_dir(tmp_path_factory.mktemp("model"), "mobilenet_v3_small")


@FEWER
@given(content=manifests)
def test_manifests_of_any_bytes_through_split_evaluate_audit_and_channels(content: bytes, model_dir: Path):
    from bincount.backends.local.train import make_channels
    from bincount.config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        good = [{"id": f"{i:05d}", "count": i % 2, "image": f"raw/{i}.jpg"} for i in range(12)]
        (work / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
        assert run("split", "--workdir", work).exit_code == 0
        before = {p: p.read_bytes() for p in (work / "splits").iterdir()}
        (work / "manifest.jsonl").write_bytes(content)
        res = run("split", "--workdir", work)
        assert_ok_or_one_line(res)
        if res.exit_code:  # a refused manifest leaves the last good split alone
            assert {p: p.read_bytes() for p in (work / "splits").iterdir()} == before
        (work / "splits" / "test.jsonl").write_bytes(content)
        for command in ("evaluate", "audit"):
            assert_ok_or_one_line(run(command, "--workdir", work, "--model", model_dir))
        settings = load_settings(overrides={"workdir": str(work)}, environ={})
        for name in ("train", "val"):
            (work / "splits" / f"{name}.jsonl").write_bytes(content)
        try:
            make_channels(settings)
        except BincountError as exc:
            assert "\n" not in str(exc)


# -- image bytes -------------------------------------------------------------------------------
def _image(fmt: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buf, fmt)
    return buf.getvalue()


def _claims(width: int, height: int) -> bytes:
    data = bytearray(_image("JPEG", (8, 8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@st.composite
def mangled(draw) -> bytes:
    data = bytearray(_image(draw(st.sampled_from(["JPEG", "PNG", "BMP", "GIF"])), (16, 12)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:draw(st.integers(0, len(data)))])


images = (st.binary(max_size=400) | mangled()
          | st.builds(_claims, st.integers(1, 65535), st.integers(1, 65535)))


@pytest.fixture(scope="module")
def target(model_dir):
    from bincount.predict import ModelTarget

    return ModelTarget(model_dir)


@FEW
@given(data=images, content_type=st.sampled_from(["image/jpeg", "image/png", "application/x-image"]))
def test_predict_answers_or_reports_each_bad_image(data: bytes, content_type: str, target):
    try:
        answer = target.predict(data, content_type)
    except ValueError as exc:  # run_predictions turns this into the item's error; the others still come back
        assert str(exc) and not str(exc).startswith("internal error"), exc
    else:
        assert 0 <= answer["count"] <= 5 and 0 <= answer["confidence"] <= 1


@FEWER
@given(data=st.lists(images, min_size=1, max_size=3))
def test_evaluate_scores_or_skips_each_bad_image(data: list[bytes], model_dir: Path):
    from bincount.evaluate import predict_counts

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, blob in enumerate(data):
            paths.append(Path(tmp) / f"{i}.jpg")
            paths[-1].write_bytes(blob)
        predicted, _ = predict_counts(model_dir, paths)
        assert len(predicted) == len(paths) and all(p is None or 0 <= p <= 5 for p in predicted)


@FEWER
@given(data=images, label=labels)
def test_fetch_keeps_good_items_and_rejects_bad_bytes(data: bytes, label: bytes, synth_source: Path):
    with tempfile.TemporaryDirectory() as tmp:
        source, work = Path(tmp) / "source", Path(tmp) / "work"
        for sub in (mf.IMAGES, mf.LABELS):
            (source / sub).mkdir(parents=True)
        for ident in ("00001", "00002"):  # two good items from the synthetic bucket
            for key in (mf.image_key(ident), mf.label_key(ident)):
                (source / key).write_bytes((synth_source / key).read_bytes())
        (source / mf.image_key("00003")).write_bytes(data)
        (source / mf.label_key("00003")).write_bytes(label)
        first = run("fetch", "--workdir", work, "--source", source, "--ids", "1-2")
        assert first.exit_code == 0, first.stderr
        kept = {p: p.read_bytes() for p in (work / "raw").rglob("*") if p.is_file()}
        res = run("fetch", "--workdir", work, "--source", source, "--ids", "1-3", "--json")
        assert_ok_or_one_line(res)
        assert res.exit_code == 0  # the two good items always make it
        result = json.loads(res.stdout)
        assert result["items"] in (2, 3) and result["present"] == 2
        assert all(p.read_bytes() == blob for p, blob in kept.items())  # nothing fetched before is lost


@FEW
@given(content=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
       | st.dictionaries(st.sampled_from(["training", "endpoint", "tuning", "channels", "training_pending"]),
                         json_values, max_size=3).map(lambda d: json.dumps(d).encode())
       | deep.map(lambda s: s.replace("{a: ", '{"a": ').encode()))
def test_state_json_of_any_bytes_is_read_or_refused_in_one_line(content: bytes):
    from bincount.state import State
    from bincount.workspace import Workspace

    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace(tmp)
        ws.state_path.write_bytes(content)
        try:
            assert isinstance(ws.state(), State)
        except BincountError as exc:
            assert "\n" not in str(exc)
        assert ws.state_path.read_bytes() == content
