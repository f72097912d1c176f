"""A small, streaming reader and writer of the safetensors format.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header), and the raw little-endian bytes. Reading one tensor at a time with a seek
keeps peak memory at one tensor, which is what merging checkpoints larger than memory needs
(DESIGN.md §6); bfloat16 goes through ``ml_dtypes``. Every structural problem of a file
(truncated, bad header, overlapping or out-of-range offsets) raises
:class:`SafetensorsError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "SafetensorsReader", "SafetensorsWriter", "load", "save"]

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file is not a valid safetensors file; the message names it and what is wrong."""


class SafetensorsReader:
    """Reads tensors one at a time from a safetensors file.

    Example::

      with SafetensorsReader("model.safetensors") as r:
          for name in r.keys():
              x = r.get(name)   # only this tensor is in memory
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no safetensors file at {self.path}")
        self._f = open(self.path, "rb")
        size = self.path.stat().st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(
                f"{self.path}: file too short ({size} bytes) for a safetensors header"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{self.path}: header length {n} does not fit the file of {size} bytes"
            )
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        data_len = size - self._base
        self._info = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                b, e = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {info!r}"
                ) from None
            want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if e - b != want or b < 0 or e > data_len:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} spans bytes [{b}, {e}) of {data_len}; its shape {shape} "
                    f"and dtype {info['dtype']} need {want} (file truncated or header corrupt)"
                )
            self._info[name] = (dtype, shape, b)
            spans.append((b, e, name))
        spans.sort()
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
            if b1 < e0:
                raise SafetensorsError(f"{self.path}: tensors {n0!r} and {n1!r} overlap")

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self._info, key=lambda k: self._info[k][2])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._info[name][0]

    def get(self, name: str) -> np.ndarray:
        """Reads one tensor (a fresh array; nothing else stays in memory)."""
        if name not in self._info:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        dtype, shape, b = self._info[name]
        self._f.seek(self._base + b)
        count = int(np.prod(shape, dtype=np.int64))
        arr = np.fromfile(self._f, dtype=dtype.newbyteorder("<"), count=count)
        if arr.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated")
        return arr.reshape(shape).astype(dtype, copy=False)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, with the layout declared up front.

    The file is written as ``<path>.part`` and renamed into place by :meth:`close`, so a
    crash never leaves a half-written file under the final name.

    Args:
      path: the output file.
      layout: ``[(name, shape, dtype), ...]`` in the order tensors will be written.
      metadata: string-to-string metadata for the header.
    """

    def __init__(
        self, path, layout: Iterable[tuple[str, tuple[int, ...], np.dtype]], metadata=None
    ):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".part")
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._order = []
        off = 0
        for name, shape, dtype in layout:
            dtype = np.dtype(dtype)
            if dtype not in _NAMES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + n],
            }
            self._order.append((name, tuple(shape), dtype))
            off += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        """Writes the next tensor of the declared layout."""
        if self._next >= len(self._order):
            raise ValueError(
                f"{self.path}: all {len(self._order)} declared tensors are written; got {name!r}"
            )
        want, shape, dtype = self._order[self._next]
        array = np.asarray(array)
        if name != want or array.shape != shape or array.dtype != dtype:
            raise ValueError(
                f"{self.path}: expected tensor {want!r} {shape} {dtype} next, got {name!r} {array.shape} {array.dtype}"
            )
        self._f.write(np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes())
        self._next += 1

    def close(self) -> Path:
        if self._next != len(self._order):
            self._f.close()
            raise ValueError(
                f"{self.path}: only {self._next} of {len(self._order)} tensors were written"
            )
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a file into a dict."""
    with SafetensorsReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> Path:
    """Writes a dict of arrays as a safetensors file (atomically)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    w = SafetensorsWriter(path, [(k, v.shape, v.dtype) for k, v in arrays.items()], metadata)
    for k, v in arrays.items():
        w.write(k, v)
    return w.close()
