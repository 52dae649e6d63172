"""The SageMaker inference handlers on a tiny real model: formats, batches, and every kind of bad input."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest

from bincount.artifacts import write_model_dir
from bincount.container import inference


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (48, 40), colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return inference.model_fn(str(write_model_dir(tmp_path_factory.mktemp("model"), "mobilenet_v3_small")))


def serve(body, content_type, bundle, accept="application/json"):
    return json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(body, content_type), bundle), accept))


@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("JPEG", "application/x-image"),
                                       ("PNG", "image/jpeg; charset=binary")])
def test_single_image_gives_one_object(bundle, fmt, ctype):
    out = serve(image_bytes(fmt), ctype, bundle)
    assert set(out) == {"count", "confidence", "probabilities"}
    assert out["count"] in range(6)
    assert list(out["probabilities"]) == [str(c) for c in range(6)]
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-4
    assert out["confidence"] == max(out["probabilities"].values())


def test_json_batches_are_always_lists_and_match_single_calls(bundle):
    a, b = image_bytes("JPEG"), image_bytes("PNG", colour=(10, 200, 90))
    b64 = [base64.b64encode(x).decode() for x in (a, b)]
    out = serve(json.dumps({"instances": b64}), "application/json", bundle)
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["count"] == serve(a, "image/jpeg", bundle)["count"]
    assert out[0]["confidence"] == pytest.approx(serve(a, "image/jpeg", bundle)["confidence"], abs=1e-5)
    one = serve(json.dumps(b64[:1]).encode(), "application/json", bundle)  # a bare list of one
    assert isinstance(one, list) and len(one) == 1


@pytest.mark.parametrize("body,ctype,status,words", [
    (b"", "image/jpeg", 400, "empty body"),
    (b"hello, not a picture", "image/jpeg", 400, "not an image"),
    (image_bytes("JPEG", (200, 200))[:300], "image/jpeg", 400, "truncated"),  # cut in the header
    (image_bytes("PNG", (300, 300))[:-40], "image/png", 400, "truncated"),  # cut in the pixel data
    (image_bytes("PNG"), "text/plain", 415, "unsupported content type"),
    (b"\xff" * (6 * 1024 * 1024 + 1), "image/jpeg", 413, "byte limit"),
    (png_header_only(8000, 8000), "image/png", 413, "pixel limit"),
    (png_header_only(20000, 20000), "image/png", 413, "too large"),
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"instances": []}', "application/json", 400, "empty"),
    (b'{"instances": ["@@@"]}', "application/json", 400, "base64"),
    (b'{"image": "abc"}', "application/json", 400, "instances"),
    (json.dumps(["aGk="] * 65).encode(), "application/json", 413, "over the limit"),
])
def test_bad_input_raises_request_error_with_status(body, ctype, status, words):
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(body, ctype)
    assert err.value.status == status
    assert words in str(err.value)


def test_batch_pixel_total_is_limited(monkeypatch):
    monkeypatch.setattr(inference, "MAX_PIXELS", 3000)
    b64 = base64.b64encode(image_bytes("PNG", (40, 40))).decode()
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(json.dumps([b64, b64]), "application/json")
    assert err.value.status == 413


def test_output_refuses_other_accept_types(bundle):
    prediction = inference.predict_fn(inference.input_fn(image_bytes(), "image/jpeg"), bundle)
    assert json.loads(inference.output_fn(prediction, "*/*"))["count"] in range(6)
    with pytest.raises(inference.RequestError) as err:
        inference.output_fn(prediction, "text/csv")
    assert err.value.status == 406


def test_big_batches_are_split_into_forward_chunks(bundle, monkeypatch):
    monkeypatch.setattr(inference, "FORWARD_BATCH", 2)
    b64 = [base64.b64encode(image_bytes(colour=(i * 40, 0, 0))).decode() for i in range(5)]
    assert len(serve(json.dumps(b64), "application/json", bundle)) == 5


def test_in_sagemaker_containers_request_errors_are_toolkit_errors_with_their_status(tmp_path, monkeypatch):
    """SageMaker's serving toolkit answers a BaseInferenceToolkitError with its status_code (else a 500)."""
    import sys
    import textwrap

    from bincount.handlers import load_handlers

    site = tmp_path / "site" / "sagemaker_inference"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    (site / "errors.py").write_text(textwrap.dedent("""
        class BaseInferenceToolkitError(Exception):
            def __init__(self, status_code, message, phrase):
                self.status_code, self.message, self.phrase = status_code, message, phrase
                super().__init__(status_code, message, phrase)
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("sagemaker_inference", "sagemaker_inference.errors"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = load_handlers(write_model_dir(tmp_path / "model", "mobilenet_v3_small"))
    from sagemaker_inference.errors import BaseInferenceToolkitError

    with pytest.raises(BaseInferenceToolkitError) as err:
        module.input_fn(image_bytes(), "text/plain")
    assert (err.value.status_code, err.value.status) == (415, 415)
    assert str(err.value).startswith("unsupported content type")
    for name in ("sagemaker_inference", "sagemaker_inference.errors"):
        sys.modules.pop(name, None)


def test_a_model_recorded_with_tta_serves_the_averaged_views(tmp_path):
    import torch
    from PIL import Image

    from bincount.container import net

    plain = inference.model_fn(str(write_model_dir(tmp_path / "plain", "resnet18", seed=3)))
    tta = inference.model_fn(str(write_model_dir(tmp_path / "tta", "resnet18", seed=3, tta=True)))
    picture = Image.new("RGB", (40, 40), (20, 200, 90))
    picture.paste((250, 10, 10), (0, 0, 14, 9))  # one object in a corner: the views differ
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    got_plain, got_tta = serve(buf.getvalue(), "image/png", plain), serve(buf.getvalue(), "image/png", tta)
    x = net.preprocess(picture, 32)[None]
    with torch.inference_mode():
        expected = net.predict_proba(tta["model"], x, tta=True)[0].tolist()
        single = net.predict_proba(tta["model"], x)[0].tolist()
    assert list(got_tta["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
    assert list(got_plain["probabilities"].values()) == pytest.approx(single, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(expected, single)) > 1e-4


def test_large_jpegs_decode_in_draft_mode_and_normal_ones_exactly_as_before():
    from PIL import Image

    big = image_bytes("JPEG", (6000, 4500))
    (image,) = inference.input_fn(big, "image/jpeg")
    assert image.size == (1500, 1125) and image.mode == "RGB"  # 1/4 scale, decoded by libjpeg at that size
    normal = image_bytes("JPEG", (1600, 1200), colour=(30, 120, 200))
    (image,) = inference.input_fn(normal, "image/jpeg")
    assert image.tobytes() == Image.open(io.BytesIO(normal)).convert("RGB").tobytes()


def test_the_pixel_budget_makes_requests_wait_then_answers_503_and_is_given_back(bundle, monkeypatch):
    import gc

    budget = inference.PixelBudget(3000, timeout=0.2)
    monkeypatch.setattr(inference, "PIXEL_BUDGET", budget)
    body = image_bytes("PNG", (40, 40))  # 1600 pixels: one request fits, two do not
    held = inference.input_fn(body, "image/png")
    assert budget.used == 1600
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(body, "image/png")
    assert err.value.status == 503 and "busy" in str(err.value)
    inference.predict_fn(held, bundle)  # done with the pixels
    assert budget.used == 0
    dropped = inference.input_fn(body, "image/png")
    del dropped  # never predicted (a failed request): given back when collected
    gc.collect()
    assert budget.used == 0
    with pytest.raises(inference.RequestError) as err:
        inference.input_fn(image_bytes("PNG", (60, 60)), "image/png")
    assert err.value.status == 413 and "budget" in str(err.value)


@pytest.mark.parametrize("change,words", [
    ({"image_size": 12000}, "image_size is 12000"),  # 13.5 GB to predict one 64x64 image
    ({"image_size": "224"}, "image_size"),
    ({"std": [0, 0.224, 0.225]}, "std is"),  # NaN answers
    ({"std": [0.229, float("nan"), 0.225]}, "std is"),
    ({"mean": [0.5, 0.5]}, "mean is"),
    ({"num_classes": 10**9, "classes": [0, 1]}, "num_classes is 1000000000"),
    ({"classes": [0, 1, 2, 3, 4, -5]}, "classes is"),
    ({"classes": [0, 0, 1, 2, 3, 4]}, "classes is"),
    ({"arch": "vit_h_14"}, "arch is 'vit_h_14'"),
    ({"tta": "yes"}, "tta is 'yes'"),
])
def test_meta_json_values_are_checked_on_load(tmp_path, change, words):
    model_dir = write_model_dir(tmp_path / "m", "mobilenet_v3_small")
    meta = json.loads((model_dir / "meta.json").read_text())
    (model_dir / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match="meta.json: ") as info:
        inference.model_fn(str(model_dir))
    assert words in str(info.value)


def test_a_model_that_answers_nan_gets_an_error_never_a_nan_in_the_json(bundle):
    import torch

    class Broken(torch.nn.Module):  # weights gone NaN
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], 6), float("nan"))

    broken = {**bundle, "model": Broken().eval()}
    with pytest.raises(ValueError, match="non-finite probability"):
        serve(image_bytes(), "image/jpeg", broken)


def test_decode_cost_counts_what_decoding_really_takes():
    """Measured peak RSS of one decode (MB): progressive JPEG 8000x8000 4:2:0 199 (draft mode does not help: libjpeg
    buffers every coefficient), baseline 16; PNG 4096x4096 RGB 64, RGBA 128, palette 80; WebP 4096x4096 259.
    decode_cost (pixels of 4 bytes) says the same within 5%, so the budget and the limits bound real memory."""
    from PIL import Image

    def cost_mb(image: Image.Image, fmt: str, **kw) -> float:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        data = buf.getvalue()
        opened = Image.open(io.BytesIO(data))
        if fmt == "JPEG":
            opened.draft("RGB", (1024, 1024))
        return inference.decode_cost(opened, data, *image.size) * 4 / 2**20

    big, side = Image.new("RGB", (8000, 8000), (90, 140, 60)), Image.new("RGB", (4096, 4096), (90, 140, 60))
    measured = {"progressive": (cost_mb(big, "JPEG", progressive=True), 199), "baseline": (cost_mb(big, "JPEG"), 16),
                "rgb png": (cost_mb(side, "PNG"), 64), "rgba png": (cost_mb(side.convert("RGBA"), "PNG"), 128),
                "palette png": (cost_mb(side.convert("P"), "PNG"), 80),
                "webp": (cost_mb(side, "WEBP", lossless=True), 259)}
    for kind, (cost, rss) in measured.items():
        assert abs(cost - rss) <= 0.05 * rss + 1, (kind, cost, rss)


def test_hostile_images_are_refused_by_what_they_cost_to_decode():
    from PIL import Image

    def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        return buf.getvalue()

    big = Image.new("RGB", (8000, 8000), (90, 140, 60))
    with pytest.raises(inference.RequestError, match="several scans.*MB a request may use") as info:
        inference.input_fn(encoded(big, "JPEG", progressive=True), "image/jpeg")
    assert info.value.status == 413
    assert len(inference.input_fn(encoded(big, "JPEG"), "image/jpeg")) == 1  # baseline: draft mode really is cheap
    with pytest.raises(inference.RequestError, match="WEBP"):
        inference.input_fn(encoded(Image.new("RGB", (4096, 4096)), "WEBP", lossless=True), "application/x-image")
    assert inference._jpeg_scans(encoded(Image.new("RGB", (64, 64)), "JPEG", progressive=True)) > 1
    assert inference._jpeg_scans(encoded(Image.new("RGB", (64, 64)), "JPEG")) == 1
