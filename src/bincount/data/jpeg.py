"""Whether a JPEG holds enough image data for the frame its header claims (a pure function over bytes).

A 633-byte JPEG whose header says 5000x5000 decodes without an error: libjpeg fills the missing rows
with grey and only warns. Every 8x8 block of every component costs at least one bit of Huffman-coded
data (its DC difference; a baseline block also an end-of-block code), so a frame of B blocks needs at
least B/8 bytes of entropy-coded data across its scans. Fewer is a truncated or forged file.
Arithmetic-coded JPEGs (SOF9-SOF15, very rare) compress a flat image below that bound: not checked.
"""

from __future__ import annotations

import re

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}  # Huffman-coded frames (baseline, extended, progressive, ...)
_SOF_ARITHMETIC = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the first marker after a scan's data (not a stuffed FF or RSTn)


def scan_data_problem(data: bytes) -> str | None:
    """Why `data` (a whole JPEG file) cannot fill its frame, or None (also for what is not a JPEG or what
    this cannot judge: the decoder has the last word on those)."""
    if data[:2] != b"\xff\xd8":
        return None
    frame, huffman, entropy, i, n = None, True, 0, 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not where a marker should be: the decoder will say what is wrong
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        segment = data[i + 4:i + 2 + length]
        if marker in _SOF or marker in _SOF_ARITHMETIC:
            frame = _blocks(segment)
            huffman = marker in _SOF
        i += 2 + length
        if marker == 0xDA:  # start of scan: its entropy-coded data runs to the next marker
            end = _SCAN_END.search(data, i)
            stop = end.start() if end else n
            entropy += stop - i
            i = stop
    if frame is None or not huffman:
        return None
    (width, height), blocks = frame
    need = blocks // 8
    if entropy < need:
        return (f"the header says {width}x{height} but the file holds {entropy:,} bytes of image data, "
                f"fewer than the {need:,} that frame needs (truncated or forged)")
    return None


def _blocks(sof: bytes) -> tuple[tuple[int, int], int] | None:
    """(width, height) and the number of 8x8 blocks of a frame header, all components and MCU padding."""
    if len(sof) < 6:
        return None
    height, width, count = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big"), sof[5]
    factors = [(sof[7 + 3 * c] >> 4, sof[7 + 3 * c] & 15) for c in range(count) if 8 + 3 * c <= len(sof)]
    if not factors or width == 0 or height == 0:
        return None
    if len(factors) == 1:  # one component: not interleaved, no MCU padding
        return (width, height), -(-width // 8) * -(-height // 8)
    hmax, vmax = max(h for h, _ in factors) or 1, max(v for _, v in factors) or 1
    mcus = -(-width // (8 * hmax)) * -(-height // (8 * vmax))
    return (width, height), mcus * sum(h * v for h, v in factors)
