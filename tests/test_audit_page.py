"""The audit page (issue 23.3): reports/audit.html beside the CSV, self-contained, escaped, small for 10,000 bins,
and rendered by a real browser (headless Chromium from the system packages; `make install` adds it where apt is)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bincount.audit import page
from bincount.audit.core import report
from tests.test_audit import sure_of_two, work  # noqa: F401 - fixtures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: `make install` installs it where "
                                                            "apt-get is available (sudo apt-get install chromium)")


def browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})


def photo(path: Path, seed: int) -> Path:
    """A 640x480 photo-like JPEG (noise: the worst case for a thumbnail's size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def records(folder: Path, n: int) -> list[dict]:
    """n result records over 20 photos: every 7th a confident disagreement, every 5th unsure."""
    images = [photo(folder / f"p{i}.jpg", i) for i in range(20)]
    out = []
    for i in range(n):
        expected = i % 6
        predicted = (expected + 1) % 6 if i % 7 == 0 else expected
        confidence = 0.4 if i % 5 == 0 else 0.9
        out.append({"n": i, "id": f"bin{i:05d}", "image": f"p{i % 20}.jpg", "path": str(images[i % 20]),
                    "expected": expected, "predicted": predicted, "confidence": confidence, "error": None,
                    "second": (predicted + 2) % 6, "second_confidence": 0.05})
    return out


def test_page_for_10000_bins_is_small_and_shows_the_flagged_bins_first(tmp_path):
    out = tmp_path / "reports" / "audit.csv"
    result = report(records(tmp_path, 10_000), out, source="big.jsonl", target="model m", threshold=0.6, top=5,
                    total=10_000)
    html = Path(result.html)
    assert html == out.with_name("audit.html") and html.is_file()
    text = html.read_text()
    size = html.stat().st_size
    assert size < 1_500_000, f"{size:,} bytes for 10,000 bins"
    shown = page.SHOWN["investigate"] + page.SHOWN["recount"]  # no errors here
    assert text.count('<tr class="bin">') == shown and text.count("data:image/jpeg;base64,") == shown
    actions = re.findall(r'<tr class="bin"><td>.*?</td><td>bin\d+</td><td class="(\w+)">', text)
    assert actions == ["investigate"] * page.SHOWN["investigate"] + ["recount"] * page.SHOWN["recount"]
    assert f"{page.SHOWN['investigate']} of {result.investigate} investigate" in text
    assert f"{page.SHOWN['recount']} of {result.recount} recount" in text
    assert "http://" not in text.replace("http-equiv", "") and "<script" not in text  # self-contained


def test_names_labels_and_errors_are_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">&<b>'
    rows = [{"n": 0, "id": evil, "image": evil + ".jpg", "path": str(tmp_path / "none.jpg"), "expected": 1,
             "predicted": 2, "confidence": 0.99, "error": None},
            {"n": 1, "id": "b", "image": "b.jpg", "path": None, "expected": None, "predicted": None,
             "confidence": None, "error": "<script>alert(2)</script>"}]
    result = report(rows, tmp_path / "r" / "audit.csv", source=f"{evil}.jsonl", target=evil, threshold=0.5, top=5)
    text = Path(result.html).read_text()
    assert evil not in text and "<script>" not in text and "onerror=\"" not in text
    assert html_escaped(evil) in text and "&lt;script&gt;alert(2)&lt;/script&gt;" in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


@needs_browser
def test_the_page_renders_in_a_real_browser(cli, work, sure_of_two, tmp_path):  # noqa: F811
    res = cli("audit", "--workdir", work, "--model", sure_of_two, "--threshold", "0.5", "--json")
    result = json.loads(res.stdout)
    html = Path(result["html"])
    assert html == work / "reports" / "audit.html"
    dom = browser(tmp_path, "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    shown = re.findall(r'<tr class="bin"><td><img src="data:image/jpeg;base64,[^"]+" alt="bin (\d+)">', dom.stdout)
    assert shown == ["00002", "00004"]  # the two confident disagreements, with their photos
    assert "00006" in dom.stdout and "not found" in dom.stdout  # the missing image: listed, no photo
    assert 'id="quality"' in dom.stdout and "threshold" in dom.stdout and "0.50" in dom.stdout
    shot = tmp_path / "audit.png"
    res = browser(tmp_path, f"--screenshot={shot}", "--window-size=1200,900", html.as_uri())
    assert res.returncode == 0 and shot.stat().st_size > 5_000
    if os.environ.get("BINCOUNT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["BINCOUNT_KEEP_SCREENSHOT"])
