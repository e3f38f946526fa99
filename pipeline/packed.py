"""Vectors packed for a job's stored stage output: float32, little-endian, row after row, in base64.

A job's extract output carries its facts' vectors to the decide stage (`pipeline.types.ExtractedFacts`,
field ``vectors``) through Redis. As JSON numbers 384 floats take ~7.7 KB; packed they take 2 KB
(1,536 bytes before base64), and unpacking is one `array` copy instead of parsing 384 numbers. float32
is what Qdrant stores, so no precision is lost on the way to the store.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence

__all__ = ["pack", "unpack"]


def pack(vectors: Sequence[Sequence[float]]) -> str:
    """`vectors` (rows of equal length) as base64 of little-endian float32, row after row; ``""`` for none."""
    flat = array("f", (x for row in vectors for x in row))
    if sys.byteorder == "big":
        flat.byteswap()
    return base64.b64encode(flat.tobytes()).decode("ascii")


def unpack(text: str, rows: int) -> list[list[float]]:
    """The `rows` vectors `pack` wrote (each ``len / rows`` floats).

    Raises:
        ValueError: `text` is not base64, or does not hold `rows` rows of equal length.
    """
    if rows == 0:
        if text:
            raise ValueError("packed vectors given for no rows")
        return []
    flat = array("f")
    flat.frombytes(base64.b64decode(text.encode("ascii"), validate=True))
    if sys.byteorder == "big":
        flat.byteswap()
    if not flat or len(flat) % rows:
        raise ValueError(f"{len(flat)} packed floats do not make {rows} rows")
    width = len(flat) // rows
    return [flat[i * width:(i + 1) * width].tolist() for i in range(rows)]
