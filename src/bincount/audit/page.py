"""The audit page: reports/audit.html beside the CSV, one self-contained file to look at.

It shows the model's quality and the threshold used (with any warning), the counts per action, and the
first bins to look at in the ranking's order (up to SHOWN per action: investigate, recount, errors), each with its
photo (a THUMB-pixel JPEG embedded as a data: URI), the recorded and predicted counts, the runner-up and
the confidence. Only those bins get a thumbnail, so the page stays small whatever the number of bins
(about 0.5 MB at most); the CSV has every bin. Everything from file names, ids, labels and errors is
HTML-escaped; the page runs no script and loads nothing.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from bincount.workspace import temp_beside

SHOWN = {"investigate": 50, "recount": 40, "error": 10}  # bins shown per action, at most (a thumbnail each)
ROWS = sum(SHOWN.values())
THUMB = 160  # a thumbnail's longer side, pixels
MAX_IMAGE = 20 << 20  # bytes of an image read for a thumbnail, at most

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
.warn{background:#fde8e8;border:1px solid #e0a0a0;padding:.6em 1em;margin:.6em 0;color:#900}
.investigate{color:#b00;font-weight:bold}.recount{color:#a60}.error{color:#b00}
img{max-width:160px;max-height:160px;display:block}.num{text-align:right}dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px}
dt{font-weight:bold}dd{margin:0}"""


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def thumbnail(path: str | None, reader: Any) -> str | None:
    """A data: URI of a small JPEG of the image at `path`, or None when it cannot be read."""
    if not path:
        return None
    try:
        from PIL import Image

        if path.startswith("s3://"):
            if reader is None:
                return None
            body = reader.image(path)[0]
        else:
            with open(path, "rb") as fh:
                body = fh.read(MAX_IMAGE + 1)
            if len(body) > MAX_IMAGE:
                return None
        with Image.open(io.BytesIO(body)) as im:
            im.draft("RGB", (THUMB, THUMB))
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
    except Exception:  # noqa: BLE001 - a missing or broken image gets no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def render(result: Any, flagged: list[dict[str, Any]], reader: Any, audited: str) -> str:
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"  # noqa: E731
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'">',
           f"<title>bincount audit: {e(result.manifest)}</title><style>{STYLE}</style></head><body>",
           f"<h1>bincount audit</h1><p>{e(result.bins)} bins from {e(result.manifest)}, audited {e(audited)}</p>"]
    for warning in result.warnings:
        out.append(f'<div class="warn" role="alert">warning: {e(warning)}</div>')
    out.append('<h2>Model</h2><dl id="quality">')
    facts = [("threshold", f"{result.threshold:.2f}")]
    if result.quality:
        facts = result.quality.lines() + facts
    else:
        facts.insert(0, ("model", result.target))
    facts += [("agreement", f"{pct(result.agreement)} of {result.scored} scored"),
              ("trusted", f"{result.trusted} (agreement among them {pct(result.trusted_agreement)})"),
              ("investigate", f"{result.investigate} (confident disagreements: likely record errors)"),
              ("recount", f"{result.recount} (confidence below the threshold: for a person)"),
              ("errors", result.errors), ("csv", result.csv)]
    out += [f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts]
    out.append("</dl>")
    totals = {"investigate": result.investigate, "recount": result.recount, "error": result.errors}
    shown = {a: sum(r["action"] == a for r in flagged) for a in totals}
    parts = ", ".join(f"{shown[a]} of {totals[a]} {a}" for a in totals if totals[a])
    out.append(f'<h2>Bins to look at</h2><p id="shown">shown: {parts or "none"}'
               + (f"; every bin is in {e(Path(result.csv).name)}" if shown != totals else "") + "</p>")
    out.append('<table id="bins"><thead><tr><th>photo</th><th>id</th><th>action</th><th class="num">recorded</th>'
               '<th class="num">predicted</th><th class="num">confidence</th><th class="num">runner-up</th>'
               "<th>image</th></tr></thead><tbody>")
    for row in flagged:
        src = thumbnail(row.get("path"), reader)
        photo = f'<img src="{src}" alt="bin {e(row["id"])}">' if src else "no image"
        conf = "" if row.get("confidence") is None else f"{row['confidence']:.3f}"
        second = "" if row.get("second") is None else f"{row['second']} ({row.get('second_confidence') or 0:.3f})"
        action = e(row["action"]) + (f": {e(row['error'])}" if row.get("error") else "")
        out.append(f'<tr class="bin"><td>{photo}</td><td>{e(row["id"])}</td><td class="{e(row["action"])}">{action}</td>'
                   f'<td class="num">{e(row.get("expected"))}</td><td class="num">{e(row.get("predicted"))}</td>'
                   f'<td class="num">{conf}</td><td class="num">{e(second)}</td><td>{e(row.get("image"))}</td></tr>')
    out.append("</tbody></table></body></html>\n")
    return "\n".join(out)


def write(result: Any, flagged: list[dict[str, Any]], dest: Path, reader: Any, audited: str) -> Path:
    """Write the page atomically to `dest` (`reader`: the audit's image reader, for s3:// images; may be None)."""
    text = render(result, flagged, reader, audited)
    fd, part = temp_beside(dest)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(part, dest)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return dest
