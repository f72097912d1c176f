"""A small, streaming reader and writer of the safetensors format.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header), and the raw little-endian bytes. Reading one tensor at a time with a seek
keeps peak memory at one tensor, which is what merging checkpoints larger than memory needs
(:mod:`cljax.merging`'s streaming merge); bfloat16 and float8 go through ``ml_dtypes``.

The reader checks a file as strictly as the reference implementation (the ``safetensors``
crate's ``SafeTensors::read_metadata`` and ``Metadata::validate``) before it reads any tensor:

- the header length is at most 100,000,000 bytes and fits the file;
- the header is UTF-8 JSON (no ``NaN``/``Infinity``), an object, nested at most 128 deep
  (``serde_json``'s limit) and with no duplicate keys at any level (stricter than the
  reference, which keeps the last of two equal ``__metadata__`` keys);
- ``"__metadata__"`` is the only entry that is not a tensor and maps strings to strings;
- each tensor has a known ``dtype``, a ``shape`` of non-negative integers (not strings,
  floats or booleans) and ``data_offsets`` of exactly two integers ``[begin, end]``;
- ``end - begin`` equals ``prod(shape) * itemsize`` (no overflow past 64 bits);
- sorted by offset the tensors tile the data section: the first begins at 0, each begins
  where the previous ends, and the last ends at the end of the file.

Before parsing, a scan of the header's brackets and commas (strings skipped) bounds its
nesting and counts its JSON values; a header of more than ``_MAX_VALUES`` values (about
eight per tensor) is refused unparsed, so a hostile header cannot make the parse build an
unbounded number of Python objects (about 500,000 tensors, some 400 MB of them, at most).
Every violation raises :class:`SafetensorsError` naming the file and what is wrong. The
writer refuses what could not be read back: a tensor named ``"__metadata__"``, a repeated
name, metadata that is not strings.

References:
  The format and its validation: https://github.com/huggingface/safetensors
  (``safetensors/src/tensor.rs``).
"""

from __future__ import annotations

import json
import math
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
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_METADATA = "__metadata__"
_MAX_HEADER = 100_000_000  # the reference's MAX_HEADER_SIZE
_MAX_DEPTH = 128  # serde_json's recursion limit; a valid header nests 3 deep
_MAX_VALUES = 1 << 22  # JSON values in a header, about 8 a tensor (2-d) and 1 a metadata entry
_USIZE = 1 << 64  # shapes and offsets are u64 in the reference
_CHUNK = 1 << 18  # bytes of the header scanned at a time
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


class SafetensorsError(ValueError):
    """A file is not a valid safetensors file; the message names it and what is wrong."""


def _scan(raw: bytes) -> tuple[int, int]:
    """``(depth, values)`` of the JSON text ``raw`` without parsing it.

    ``depth`` is how deep its brackets outside strings nest (stopping early past
    ``_MAX_DEPTH``), ``values`` an upper bound on its values (elements and members, keys not
    counted): one more than its commas and opening brackets outside strings. Vectorised in
    chunks, so a 100 MB header takes about a second and a few MB besides itself.
    """
    buf = np.frombuffer(raw, np.uint8)
    depth = top = 0
    values = 1
    in_string = 0  # whether the previous chunk ended inside a string
    backslashes = 0  # the run of backslashes that ended the previous chunk
    for i in range(0, buf.size, _CHUNK):
        c = buf[i : i + _CHUNK]
        pos = np.arange(c.size)
        # the last position at or before each that is not a backslash (the run before the
        # chunk counts as positions -1, -2, ...)
        last = np.maximum.accumulate(np.where(c == ord("\\"), -1 - backslashes, pos))
        before = np.concatenate(([-1 - backslashes], last[:-1]))
        escaped = (pos - 1 - before) % 2 == 1  # after an odd run of backslashes
        quotes = np.cumsum((c == ord('"')) & ~escaped) + in_string
        outside = quotes % 2 == 0
        steps = _STEP[c] * outside
        values += int(np.count_nonzero((c == ord(",")) & outside))
        values += int(np.count_nonzero(steps == 1))
        run = np.cumsum(steps, dtype=np.int64) + depth
        top = max(top, int(run.max()))
        depth = int(run[-1])
        in_string = int(quotes[-1] % 2)
        backslashes = int(c.size - 1 - last[-1])
        if top > _MAX_DEPTH or values > _MAX_VALUES:
            break
    return top, values


def _short(x) -> str:
    """``repr(x)``, cut to a readable length for an error message."""
    r = repr(x)
    return r if len(r) <= 80 else r[:60] + f"... ({len(r)} characters)"


def _is_usize(x) -> bool:
    return type(x) is int and 0 <= x < _USIZE  # bool is a subclass of int; excluded here


def _unique_keys(path: Path):
    def pairs(pairs: list) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise SafetensorsError(f"{path}: header has the key {_short(dup)} twice")
        return out

    return pairs


def _parse_header(path: Path, raw: bytes) -> dict:
    """Decodes and parses a header's JSON, within the bounds of :func:`_scan`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{path}: header is not UTF-8: {e}") from None
    depth, values = _scan(raw)
    if depth > _MAX_DEPTH:
        raise SafetensorsError(
            f"{path}: header nests more than {_MAX_DEPTH} levels deep "
            "(a safetensors header needs 3)"
        )
    if values > _MAX_VALUES:
        raise SafetensorsError(
            f"{path}: header holds about {values} JSON values, more than the {_MAX_VALUES} "
            "this reader parses"
        )

    def constant(name):
        raise SafetensorsError(f"{path}: header holds {name}, which is not JSON")

    try:
        header = json.loads(text, object_pairs_hook=_unique_keys(path), parse_constant=constant)
    except SafetensorsError:
        raise
    except ValueError as e:  # JSONDecodeError, or an integer of too many digits
        raise SafetensorsError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    return header


def _text(path: Path, what: str, s) -> str:
    if not isinstance(s, str):
        raise SafetensorsError(f"{path}: {what} is {_short(s)}, not a string")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        raise SafetensorsError(f"{path}: {what} {_short(s)} is not valid Unicode") from None
    return s


def _tensor_info(path: Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Checks one header entry; returns ``(dtype, shape, begin, end)``."""
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: header entry is {_short(info)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise SafetensorsError(f"{where}: header entry {_short(info)} lacks {missing}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {_short(dtype)}; known: {sorted(_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_usize(s) for s in shape):
        raise SafetensorsError(
            f"{where}: shape {_short(shape)} must be a list of non-negative integers"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
        raise SafetensorsError(
            f"{where}: data_offsets {_short(offsets)} must be two non-negative integers [begin, end]"
        )
    count = 1
    for s in shape:  # in order, as the reference's checked multiplication does
        count *= s
        if count >= _USIZE:
            raise SafetensorsError(f"{where}: shape {_short(shape)} overflows 64 bits")
    return _DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


class SafetensorsReader:
    """Reads tensors one at a time from a safetensors file.

    The whole header is checked on opening (see the module docstring); tensor data is read
    only by :meth:`get`.

    Args:
      path: the file.

    Raises:
      FileNotFoundError: if ``path`` is not a file.
      SafetensorsError: if the file breaks the format, naming the file and the problem.

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
        try:
            self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(
                f"{self.path}: file too short ({size} bytes) for a safetensors header"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SafetensorsError(
                f"{self.path}: header length {n} exceeds the format's limit of {_MAX_HEADER} bytes"
            )
        if 8 + n > size:
            raise SafetensorsError(
                f"{self.path}: header length {n} does not fit the file of {size} bytes"
            )
        header = _parse_header(self.path, self._f.read(n))
        metadata = header.pop(_METADATA, None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise SafetensorsError(
                f"{self.path}: {_METADATA} is {_short(metadata)}, not an object of strings"
            )
        for k, v in metadata.items():
            _text(self.path, f"{_METADATA} key", k)
            _text(self.path, f"{_METADATA}[{_short(k)}]", v)
        self.metadata: dict[str, str] = metadata
        self._base = 8 + n
        data_len = size - self._base
        entries = []
        for name, info in header.items():
            _text(self.path, "tensor name", name)
            entries.append((name, *_tensor_info(self.path, name, info)))
        entries.sort(key=lambda t: (t[3], t[4]))  # by data_offsets, as the reference sorts
        end = 0
        for name, dtype, shape, b, e in entries:
            if e < b:
                raise SafetensorsError(
                    f"{self.path}: tensor {_short(name)} has data_offsets [{b}, {e}]: end before begin"
                )
            if b != end:
                raise SafetensorsError(
                    f"{self.path}: tensor {_short(name)} has data_offsets [{b}, {e}], but the tensors "
                    f"before it (by offset) end at byte {end}; tensors must tile the data "
                    "without gaps or overlap"
                )
            want = math.prod(shape) * dtype.itemsize
            if e - b != want:
                raise SafetensorsError(
                    f"{self.path}: tensor {_short(name)} spans {e - b} bytes [{b}, {e}), but its shape "
                    f"{_short(shape)} and dtype {_NAMES[dtype]} need {want}"
                )
            if e > data_len:
                raise SafetensorsError(
                    f"{self.path}: tensor {_short(name)} spans bytes [{b}, {e}) of {data_len}; its shape {_short(shape)} "
                    f"and dtype {_NAMES[dtype]} need {want} (file truncated or header corrupt)"
                )
            end = e
        if end != data_len:
            raise SafetensorsError(
                f"{self.path}: the tensors cover {end} bytes of a data section of {data_len} "
                "(trailing bytes after the last tensor)"
            )
        self._info = {name: (dtype, shape, b) for name, dtype, shape, b, _ in entries}

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._info)

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
        count = math.prod(shape)
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

    Raises:
      ValueError: if a name repeats, is ``"__metadata__"`` (the header's metadata key: such
        a tensor could not be read back), or a shape is not non-negative integers, or a dtype
        has no safetensors name.
      TypeError: if a name, a metadata key or a metadata value is not a string.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Iterable[tuple[str, tuple[int, ...], np.dtype]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".part")
        header: dict = {}
        if metadata:
            for k, v in metadata.items():
                if not isinstance(k, str) or not isinstance(v, str):
                    raise TypeError(
                        f"{self.path}: metadata must map strings to strings; got {k!r}: {v!r}"
                    )
            header[_METADATA] = dict(metadata)
        self._order = []
        off = 0
        for name, shape, dtype in layout:
            if not isinstance(name, str):
                raise TypeError(f"{self.path}: tensor name {name!r} is not a string")
            if name == _METADATA:
                raise ValueError(
                    f"{self.path}: a tensor cannot be named {_METADATA!r}, the header's "
                    "metadata key (it would be read back as metadata)"
                )
            if name in header:
                raise ValueError(f"{self.path}: tensor {name!r} is declared twice")
            _text(self.path, "tensor name", name)  # a lone surrogate cannot be written as UTF-8
            shape = tuple(shape)
            if not all(isinstance(d, int | np.integer) and d >= 0 for d in shape):
                raise ValueError(
                    f"{self.path}: tensor {name!r} has {shape=}; need non-negative integers"
                )
            shape = tuple(int(d) for d in shape)
            dtype = np.dtype(dtype)
            if dtype not in _NAMES:
                raise ValueError(
                    f"{self.path}: tensor {name!r}: dtype {dtype} cannot be stored in safetensors"
                )
            n = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [off, off + n],
            }
            self._order.append((name, shape, dtype))
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


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a dict of arrays as a safetensors file (atomically)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    w = SafetensorsWriter(path, [(k, v.shape, v.dtype) for k, v in arrays.items()], metadata)
    for k, v in arrays.items():
        w.write(k, v)
    return w.close()
