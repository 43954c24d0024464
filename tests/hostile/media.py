"""Hostile media for the suite: PNG files written chunk by chunk, so a header can claim any size and a real
huge image costs kilobytes on disk and no memory to make."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(path: Path, width: int = 1_000_000, height: int = 1_000_000) -> Path:
    """A 60-byte PNG whose header claims width x height pixels (10^12 by default) and holds no image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
    return path


def huge_png(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A real, valid black 1-bit PNG of width x height (30000 x 30000: 900 Mpx in about 110 kB)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def png_64x48(path: Path) -> Path:
    """An ordinary 64 x 48 RGB PNG (3,072 pixels: over a limit lowered to 2,000)."""
    from PIL import Image

    Image.new("RGB", (64, 48), (90, 120, 150)).save(path)
    return path
