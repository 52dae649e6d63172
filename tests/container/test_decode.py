"""One decode (net.decode): training from files, the serving handlers, `bincount evaluate` and the shard reader
turn the same image into the same uint8 pixels, and score them through the same net.probabilities."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

SIZE = 224


def photo(fmt: str, size: tuple[int, int]) -> bytes:
    """A photo-like picture (gradients, noise, edges): resampling differences would show in its pixels."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype("uint8")
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    for i in range(12):
        draw.rectangle([w * i // 13, h // 4, w * i // 13 + w // 30, h * 3 // 4], fill=(250, 250 - 20 * i, 20 * i))
    buf = io.BytesIO()
    picture.save(buf, format=fmt, quality=90)
    return buf.getvalue()


@pytest.fixture
def captured(monkeypatch):
    """The uint8 batches net.probabilities scores (what serving and evaluate feed the model)."""
    from bincount.container import net

    batches, real = [], net.probabilities

    def spy(model, images, *args, **kwargs):
        batches.append(images.clone())
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(net, "probabilities", spy)
    return batches


@pytest.mark.parametrize("fmt, size", [("JPEG", (640, 480)), ("PNG", (640, 480)), ("JPEG", (4096, 3072))])
def test_train_serve_evaluate_and_the_shard_reader_see_the_same_pixels(tmp_path, captured, fmt, size):
    import torch

    from bincount.artifacts import write_model_dir
    from bincount.container import batches, inference, shards
    from bincount.evaluate import predict_counts

    data = photo(fmt, size)
    path = tmp_path / f"bin.{fmt.lower()}"
    path.write_bytes(data)
    model_dir = write_model_dir(tmp_path / "model", "mobilenet_v3_small", image_size=SIZE)

    trained = next(batches.Batches([(path, 0)], SIZE, 1, cache_mb=64, num_workers=0).iterate([0]))[0][0]
    streamed = next(batches.Batches([(path, 0)], SIZE, 1, cache_mb=0, num_workers=0).iterate([0]))[0][0]
    sharded = shards.decode_item("train-000000.tar", "bin", data, SIZE).permute(2, 0, 1)
    inference.predict_fn(inference.input_fn(data, f"image/{fmt.lower()}"), inference.model_fn(str(model_dir)))
    predict_counts(Path(model_dir), [path], tta=False)
    served, evaluated = captured[0][0], captured[1][0]

    assert trained.shape == (3, SIZE, SIZE) and trained.dtype == torch.uint8
    for name, pixels in {"streamed": streamed, "shard reader": sharded, "serving": served,
                         "evaluate": evaluated}.items():
        assert torch.equal(pixels, trained), f"{name} differs from training by up to " \
            f"{(pixels.int() - trained.int()).abs().max().item()} grey levels"
