"""A loss-curve PNG with no plotting dependency: a polyline on a white canvas, written by hand."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, pixels: list[bytearray], width: int, height: int) -> None:
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
                     + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def loss_curve(path: Path, losses: list[float], width: int = 640, height: int = 360) -> None:
    """log10(loss), averaged over buckets of steps, as a blue line inside black axes."""
    margin = 20
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]

    def put(x: int, y: int, rgb: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x:3 * x + 3] = bytes(rgb)

    for x in range(margin, width - margin):
        put(x, height - margin, (0, 0, 0))
    for y in range(margin, height - margin + 1):
        put(margin, y, (0, 0, 0))
    values = [math.log10(v) for v in losses if v > 0 and math.isfinite(v)]
    if values:
        buckets = max(1, len(values) // (width - 2 * margin))
        points = [sum(values[i:i + buckets]) / len(values[i:i + buckets])
                  for i in range(0, len(values), buckets)]
        lo, hi = min(points), max(points)
        span = (hi - lo) or 1.0
        last = max(1, len(points) - 1)
        xs = [margin + round(i * (width - 2 * margin - 1) / last) for i in range(len(points))]
        ys = [height - margin - 1 - round((p - lo) / span * (height - 2 * margin - 2)) for p in points]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for t in range(steps + 1):
                put(round(x0 + (x1 - x0) * t / steps), round(y0 + (y1 - y0) * t / steps), (31, 119, 180))
        if len(points) == 1:
            put(xs[0], ys[0], (31, 119, 180))
    write_png(path, pixels, width, height)
