"""data/jpeg.py: a JPEG must hold enough scan data for the frame its header claims (issue 22.14)."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bincount.data.jpeg import scan_data_problem


def jpeg(size=(8, 8), **options) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 200)).save(buf, "JPEG", **options)
    return buf.getvalue()


def claim(data: bytes, width: int, height: int) -> bytes:
    forged = bytearray(data)
    sof = forged.index(b"\xff\xc2") if b"\xff\xc2" in forged else forged.index(b"\xff\xc0")
    forged[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(forged)


def test_a_small_file_claiming_a_huge_frame_is_caught():
    forged = claim(jpeg(), 5000, 5000)
    assert len(forged) < 700
    Image.open(io.BytesIO(forged)).load()  # the decoder accepts it (grey rows), which is why this check exists
    problem = scan_data_problem(forged)
    assert problem and "5000x5000" in problem and "truncated or forged" in problem
    assert scan_data_problem(claim(jpeg(progressive=True), 5000, 5000))


def test_a_truncated_scan_is_caught():
    whole = jpeg((800, 600), quality=95)
    assert scan_data_problem(whole) is None
    assert scan_data_problem(whole[: len(whole) // 40] + b"\xff\xd9")


def test_what_is_not_a_jpeg_is_left_to_the_decoder():
    for data in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"\xff\xd8\x00\x00garbage", b"\xff\xd8\xff\xc0\x00"):
        assert scan_data_problem(data) is None


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 700), height=st.integers(1, 700), quality=st.integers(1, 95),
       subsampling=st.sampled_from([0, 1, 2]), progressive=st.booleans(), optimize=st.booleans(),
       flat=st.booleans(), grey=st.booleans())
def test_every_real_jpeg_passes(width, height, quality, subsampling, progressive, optimize, flat, grey):
    """Whatever PIL writes (flat images compress most) has at least the bytes its frame needs."""
    import random

    mode = "L" if grey else "RGB"
    image = Image.new(mode, (width, height), 128 if grey else (128, 128, 128))
    if not flat:
        rng = random.Random(width * 1000 + height)
        image.putdata([rng.randrange(256) if grey else (rng.randrange(256),) * 3 for _ in range(width * height)])
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, progressive=progressive, optimize=optimize,
               **({} if grey else {"subsampling": subsampling}))
    assert scan_data_problem(buf.getvalue()) is None
