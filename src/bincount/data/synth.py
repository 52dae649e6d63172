"""Synthetic bin photos in the exact ABID bucket layout, so everything runs with no network.

Each picture is a real counting task: a bin-like background with walls and fabric texture, 0..N
distinct objects of varied shape, size, colour and texture (several units of one product look
alike), some partial overlap, and elastic retaining bands across the front drawn over the items.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from bincount.config import Settings
from bincount.results import Result
from bincount.workspace import atomic_write_bytes, atomic_write_text

SHAPES = ("box", "tilted_box", "ellipse", "polygon", "bottle", "pouch")
TEXTURES = ("solid", "stripes", "gradient", "speckle", "label")


class SynthResult(Result):
    out: str  # the folder written, in the bucket layout (bin-images/, metadata/)
    images: int  # bins drawn: one image and one label each
    per_count: dict[int, int]  # images per object count: count -> images, ascending
    image_size: int  # the images' side, pixels
    seed: int  # random seed: the same seed and options draw the same bins


def image_id(number: int) -> str:
    """ABID ids are zero-padded to at least five digits: 4 -> '00004', 100313 -> '100313'."""
    return f"{number:05d}"


def _colour(rng: random.Random) -> tuple[int, int, int]:
    import colorsys

    h, s, v = rng.random(), rng.uniform(0.25, 0.95), rng.uniform(0.35, 1.0)
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _background(rng: random.Random, size: int):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    nprng = np.random.default_rng(rng.randrange(2**32))
    base = np.array(rng.choice([(150, 120, 85), (120, 110, 100), (95, 95, 105), (170, 150, 115), (70, 70, 75)]), float)
    base *= rng.uniform(0.75, 1.2)
    noise = nprng.normal(0, 10, (size // 4 + 1, size // 4 + 1, 1))
    noise = np.kron(noise, np.ones((4, 4, 1)))[:size, :size]
    img = Image.fromarray(np.clip(base + noise + nprng.normal(0, 6, (size, size, 3)), 0, 255).astype("uint8"))
    draw = ImageDraw.Draw(img)
    # Bin walls in perspective: darker side panels and a back edge.
    wall = tuple(int(c * rng.uniform(0.45, 0.7)) for c in base)
    inset = int(size * rng.uniform(0.06, 0.14))
    draw.polygon([(0, 0), (inset, inset), (inset, size - inset // 2), (0, size)], fill=wall)
    draw.polygon([(size, 0), (size - inset, inset), (size - inset, size - inset // 2), (size, size)], fill=wall)
    draw.polygon([(0, 0), (size, 0), (size - inset, inset), (inset, inset)], fill=tuple(int(c * 0.8) for c in wall))
    return img.filter(ImageFilter.GaussianBlur(0.6)), inset


def _texture(rng: random.Random, w: int, h: int, colour: tuple[int, int, int]):
    import numpy as np
    from PIL import Image, ImageDraw

    kind = rng.choice(TEXTURES)
    patch = Image.new("RGB", (w, h), colour)
    draw = ImageDraw.Draw(patch)
    other = _colour(rng)
    if kind == "stripes":
        step = max(3, int(min(w, h) * rng.uniform(0.12, 0.3)))
        for x in range(-h, w, step * 2):
            draw.polygon([(x, 0), (x + step, 0), (x + step + h, h), (x + h, h)], fill=other)
    elif kind == "gradient":
        t = np.linspace(0, 1, h)[:, None, None]
        arr = np.array(colour, float) * (1 - t) + np.array(other, float) * t
        patch = Image.fromarray(np.repeat(arr, w, axis=1).astype("uint8"))
    elif kind == "speckle":
        arr = np.array(patch, float) + np.random.default_rng(rng.randrange(2**32)).normal(0, 25, (h, w, 3))
        patch = Image.fromarray(np.clip(arr, 0, 255).astype("uint8"))
    elif kind == "label":
        lw, lh = int(w * rng.uniform(0.35, 0.6)), int(h * rng.uniform(0.25, 0.45))
        x0, y0 = rng.randint(0, max(0, w - lw)), rng.randint(0, max(0, h - lh))
        draw.rectangle([x0, y0, x0 + lw, y0 + lh], fill=(238, 238, 230))
        for x in range(x0 + 2, x0 + lw - 2, 2):
            if rng.random() < 0.55:
                draw.line([(x, y0 + 2), (x, y0 + lh - 2)], fill=(20, 20, 20))
    return patch


def _mask(rng: random.Random, shape: str, w: int, h: int):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "box":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "tilted_box":
        s = rng.uniform(0.1, 0.25)
        draw.polygon([(w * s, 0), (w - 1, h * s), (w * (1 - s), h - 1), (0, h * (1 - s))], fill=255)
    elif shape == "ellipse":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "polygon":
        import math

        k = rng.randint(5, 8)
        pts = []
        for i in range(k):
            a = 2 * math.pi * i / k + rng.uniform(-0.25, 0.25)
            r = rng.uniform(0.7, 1.0)
            pts.append((w / 2 + r * (w / 2 - 1) * math.cos(a), h / 2 + r * (h / 2 - 1) * math.sin(a)))
        draw.polygon(pts, fill=255)
    elif shape == "bottle":
        neck = w * 0.3
        draw.rounded_rectangle([0, h * 0.25, w - 1, h - 1], radius=int(w * 0.25), fill=255)
        draw.rectangle([w / 2 - neck / 2, 0, w / 2 + neck / 2, h * 0.3], fill=255)
    else:  # pouch: soft rounded bag
        draw.rounded_rectangle([0, 0, w - 1, h - 1], radius=int(min(w, h) * 0.4), fill=255)
    return mask


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller else 0.0


def draw_bin(count: int, size: int, rng: random.Random, units: list[int] | None = None):
    """One bin photo holding `count` objects; `units` groups them into products (alike objects)."""
    from PIL import Image, ImageDraw, ImageFilter

    scale = 2  # draw at twice the size, then downsample for smooth edges
    big = size * scale
    img, inset = _background(rng, big)
    units = units or [1] * count
    boxes: list[tuple[int, int, int, int]] = []
    for quantity in units:
        shape, colour = rng.choice(SHAPES), _colour(rng)
        w0, h0 = int(big * rng.uniform(0.16, 0.3)), int(big * rng.uniform(0.16, 0.3))
        texture_seed = rng.randrange(2**32)
        for _ in range(quantity):
            w, h = (int(w0 * rng.uniform(0.92, 1.08)), int(h0 * rng.uniform(0.92, 1.08)))
            for attempt in range(60):  # some overlap allowed, never hiding an object
                x = rng.randint(inset, big - inset - w)
                y = rng.randint(inset, big - inset // 2 - h)
                box = (x, y, x + w, y + h)
                if all(_overlap(box, other) < (0.25 if attempt < 40 else 0.4) for other in boxes):
                    break
            boxes.append(box)
            mask = _mask(rng, shape, w, h)
            patch = _texture(random.Random(texture_seed), w, h, colour)
            shadow = Image.new("RGB", (w, h), (20, 20, 20))
            img.paste(shadow, (x + scale * 3, y + scale * 3), mask.point(lambda v: v * 0.45))
            img.paste(patch, (x, y), mask)
            ImageDraw.Draw(img).line(  # a light edge so touching items stay distinguishable
                [(x, y), (x + w, y)], fill=tuple(min(255, c + 40) for c in colour), width=scale)
    # Elastic retaining bands across the front, over the items.
    draw = ImageDraw.Draw(img)
    band = rng.choice([(30, 30, 35), (200, 190, 160), (60, 70, 140), (150, 40, 40)])
    for _ in range(rng.randint(2, 4)):
        y0, y1 = rng.randint(inset, big - inset), rng.randint(inset, big - inset)
        draw.line([(0, y0), (big, y1)], fill=band, width=rng.randint(2, 4) * scale)
    img = img.resize((size, size), Image.LANCZOS).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.5)))
    return img


def _units(count: int, rng: random.Random) -> list[int]:
    """Split a count into per-product quantities (real bins often hold several units of one product)."""
    units = []
    left = count
    while left:
        q = 1 if rng.random() < 0.6 else rng.randint(1, left)
        units.append(q)
        left -= q
    return units


def _label(units: list[int], rng: random.Random) -> dict:
    data = {}
    for quantity in units:
        asin = "B0" + "".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
        dims = {k: {"unit": "IN", "value": round(rng.uniform(0.5, 12), 2)} for k in ("height", "length", "width")}
        data[asin] = {"asin": asin, "name": f"Synthetic item {asin}", "normalizedName": f"synthetic item {asin}",
                      "quantity": quantity, **dims, "weight": {"unit": "pounds", "value": round(rng.uniform(0.1, 5), 2)}}
    return {"BIN_FCSKU_DATA": data, "EXPECTED_QUANTITY": sum(units)}


def synthesize(out: Path, n: int, image_size: int = 128, max_count: int = 5, min_count: int = 0,
               seed: int = 0, start_id: int = 1, advance: Callable[[], None] | None = None) -> dict[int, int]:
    """Write `n` images and labels into `out` (bin-images/, metadata/); counts cycle evenly, shuffled.

    advance: called after each image (a progress bar's step).
    """
    from bincount.errors import BincountError

    if min_count > max_count:
        raise BincountError(f"min_count {min_count} is larger than max_count {max_count}")
    out = Path(out)
    rng = random.Random(seed)
    counts = [min_count + i % (max_count - min_count + 1) for i in range(n)]
    rng.shuffle(counts)
    per_count: dict[int, int] = {}
    for offset, count in enumerate(counts):
        item_rng = random.Random(f"{seed}-{start_id + offset}")
        units = _units(count, item_rng)
        img = draw_bin(count, image_size, item_rng, units)
        ident = image_id(start_id + offset)
        import io

        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        atomic_write_bytes(out / "bin-images" / f"{ident}.jpg", buf.getvalue())
        atomic_write_text(out / "metadata" / f"{ident}.json", json.dumps(_label(units, item_rng), indent=1))
        per_count[count] = per_count.get(count, 0) + 1
        if advance is not None:
            advance()
    return dict(sorted(per_count.items()))


def synth(settings: Settings, out: Path | None = None, n: int = 600, image_size: int = 128,
          counts: str | None = None, seed: int = 0, start_id: int = 1) -> SynthResult:
    """CLI stage: synthesise into `out` (default <workdir>/synth); counts: a range like 1-5 (default
    0..data.max_count)."""
    from bincount.ranges import parse_int_set
    from bincount.console import progress
    from bincount.errors import BincountError

    try:
        wanted = parse_int_set(counts) if counts else list(range(settings.data.max_count + 1))
    except ValueError as exc:
        raise BincountError(f"--counts: {exc}") from None
    if wanted != list(range(wanted[0], wanted[-1] + 1)):
        raise BincountError(f"--counts {counts}: synth draws a range of counts, like 1-5")
    out = Path(out) if out else Path(settings.workdir) / "synth"
    try:  # checked before drawing: a place that cannot be written is one line, not a traceback
        with progress() as bar:
            for folder in ("bin-images", "metadata"):
                (out / folder).mkdir(parents=True, exist_ok=True)
            task = bar.add_task("drawing bins", total=n)
            per_count = synthesize(out, n, image_size, max_count=wanted[-1], min_count=wanted[0], seed=seed,
                                   start_id=start_id, advance=lambda: bar.advance(task))
    except OSError as exc:
        raise BincountError(f"cannot write {exc.filename or out}: {exc.strerror or exc} (pick another --out, or free "
                            "some space; a rerun writes the same bins)") from None
    return SynthResult(out=str(out), images=n, per_count=per_count, image_size=image_size, seed=seed)
