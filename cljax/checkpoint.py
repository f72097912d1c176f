"""Atomic, verified checkpoints of pytrees with orbax, and resume from the last good one.

A checkpoint is a folder ``<directory>/step_<N>`` holding an orbax checkpoint of a pytree
(``state/``) and a ``manifest.json`` with the size and SHA-256 of every file and the caller's
JSON metadata. It is written under a temporary name and renamed into place only once the
manifest is complete, so a crash mid-write leaves either the old set of checkpoints or the
new one, never a half-written ``step_<N>``. Older checkpoints are pruned only after the new
one is in place. The manifest carries its own checksum, so a damaged manifest (metadata
included) is detected like a damaged array file.

On restore the manifest is checked; a truncated, altered or incomplete checkpoint, or one
that orbax cannot read, is reported by name (a warning), moved aside to
``<directory>/.corrupt-<N>`` (kept for inspection, never deleted) and the previous good one
is used; with none left, :meth:`CheckpointManager.restore_latest` returns ``None`` and the
run starts over. A later save of the same step writes a fresh checkpoint in its place.

Run records (the JSON files an experiment reads back to skip finished work) follow the same
rules: :func:`save_json` writes them atomically with their own SHA-256, and :func:`load_json`
moves a damaged one aside (``<name>.corrupt-<N>``, :func:`quarantine_file`) with a warning
and returns ``None``, so the work is done again instead of failing on every re-run.

Example::

    ckpt = CheckpointManager("runs/exp/ckpt", keep=2)
    restored = ckpt.restore_latest(target=state)          # None on a fresh run
    if restored is not None:
        step, state, meta = restored
    ...
    ckpt.save(step, state, metadata={"epoch": epoch})
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from cljax.sharding import is_primary

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "load_json",
    "quarantine_file",
    "save_json",
    "tree_fingerprint",
]

_STEP_RE = re.compile(r"^step_(\d+)$")
_MANIFEST = "manifest.json"
_CORRUPT = ".corrupt-"


def _manifest_bytes(manifest: dict) -> bytes:
    """A manifest as written: the SHA-256 of its JSON body, a newline, the body."""
    body = json.dumps(manifest, sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def _parse_manifest(raw: bytes) -> dict:
    """The manifest in ``raw``; raises ``ValueError`` if it is damaged.

    A manifest without the checksum line (written by an older version) is read as plain JSON.
    """
    if raw[:1] == b"{":
        manifest = json.loads(raw)
    else:
        head, sep, body = raw.partition(b"\n")
        if not sep or hashlib.sha256(body).hexdigest().encode() != head:
            raise ValueError("its checksum does not match (altered or truncated)")
        manifest = json.loads(body)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("it has no file table")
    for rel, info in manifest["files"].items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
        ):
            raise ValueError(f"its entry of {rel!r} is malformed")
    if not isinstance(manifest.get("metadata", {}), dict):
        raise ValueError("its metadata is not a JSON object")
    return manifest


class CheckpointCorruptError(RuntimeError):
    """A checkpoint failed verification (missing manifest, missing or altered files)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _short(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to ``limit`` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != _MANIFEST)


def tree_fingerprint(tree: Any) -> str:
    """SHA-256 over the bytes, shapes and dtypes of a tree's leaves (for bitwise comparisons)."""
    import numpy as np

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys become their uint32 key data (orbax stores plain arrays)."""

    def conv(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        if isinstance(x, jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
            x.dtype, jax.dtypes.prng_key
        ):  # an abstract restore target: the key data's shape, with the key's sharding
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(conv, tree)


def _key_impl(t: Any) -> Any:
    if isinstance(t, jax.Array):
        return jax.random.key_impl(t)
    return t.dtype._impl  # abstract target: the implementation its key dtype names


def _from_storable(restored: Any, target: Any) -> Any:
    def conv(r, t):
        if isinstance(t, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
            t.dtype, jax.dtypes.prng_key
        ):
            return jax.random.wrap_key_data(r, impl=_key_impl(t))
        return r

    return jax.tree.map(conv, restored, target)


# Top-level fields renamed since checkpoints were first written: new name -> old name. A
# checkpoint that differs from its target by these names alone restores under the new ones.
_RENAMED_FIELDS = {"key": "rng"}  # TrainState.rng became TrainState.key


def _old_name(name: str) -> str:
    head, dot, rest = name.partition(".")
    return _RENAMED_FIELDS.get(head, head) + dot + rest


def _restore_renamed(ckptr: Any, path: Path, abstract: Any) -> Any:
    """Restores a checkpoint stored under old field names into ``abstract``'s structure."""
    import numpy as np
    import orbax.checkpoint as ocp

    raw = ckptr.restore(path)
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract, include_empty_nodes=False))
    leaves = []
    for name, want in zip(names, jax.tree.leaves(abstract), strict=True):
        node = raw
        for part in _old_name(name).split("."):
            node = node[int(part)] if isinstance(node, list | tuple) else node[part]
        value = np.asarray(node).astype(want.dtype)
        sharding = getattr(want, "sharding", None)
        leaves.append(jax.device_put(value, sharding) if sharding is not None else value)
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def _shared_token() -> str:
    """A random name part, the same on every process (all must write to one folder)."""
    token = uuid.uuid4().int % (1 << 31)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        token = int(multihost_utils.broadcast_one_to_all(np.int32(token)))
    return f"{token:08x}"


class CheckpointManager:
    """Keeps the last ``keep`` verified checkpoints of a pytree in ``directory``.

    Args:
      directory: folder of the checkpoints (created if missing).
      keep: number of complete checkpoints kept (>= 1). A new one is complete before any
        old one is removed, so up to ``keep + 1`` exist during a save.
      primary: whether this process writes (process 0 in multi-host runs); orbax itself
        coordinates the array writes of all processes.

    Raises:
      ValueError: if ``keep < 1``.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, primary: bool | None = None):
        if keep < 1:
            raise ValueError(f"{keep=} must be >= 1")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.primary = is_primary() if primary is None else primary
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_tmp()

    # -------------------------------------------------------------------- listing
    def _remove_stale_tmp(self) -> None:
        if not self.primary:
            return
        for p in self.directory.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def steps(self) -> list[int]:
        """Steps of the checkpoint folders present (verified or not), ascending."""
        out = []
        for p in self.directory.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.directory / f"step_{int(step)}"

    # -------------------------------------------------------------------- verification
    def verify(self, step: int) -> dict:
        """Checks a checkpoint against its manifest; returns the manifest.

        Raises:
          CheckpointCorruptError: naming the checkpoint and what is wrong with it.
        """
        root = self.path(step)
        mpath = root / _MANIFEST
        if not mpath.is_file():
            raise CheckpointCorruptError(
                f"checkpoint {root} has no {_MANIFEST} (incomplete write?)"
            )
        try:
            manifest = _parse_manifest(mpath.read_bytes())
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeError are ValueErrors
            raise CheckpointCorruptError(
                f"checkpoint {root}: unreadable {_MANIFEST}: {e}"
            ) from None
        for rel, info in manifest["files"].items():
            f = root / rel
            if not f.is_file():
                raise CheckpointCorruptError(f"checkpoint {root}: file {rel} is missing")
            size = f.stat().st_size
            if size != info["size"]:
                raise CheckpointCorruptError(
                    f"checkpoint {root}: file {rel} has {size} bytes, expected {info['size']} (truncated?)"
                )
            if _sha256(f) != info["sha256"]:
                raise CheckpointCorruptError(
                    f"checkpoint {root}: file {rel} does not match its checksum"
                )
        return manifest

    def quarantine(self, step: int, reason: str = "damaged") -> Path | None:
        """Moves checkpoint ``step`` aside to ``<directory>/.corrupt-<step>``, with a warning.

        The folder is kept (renamed, never deleted), so nothing is lost if the judgement was
        wrong; :meth:`steps` no longer lists it and a new checkpoint of the same step can be
        saved. Only the primary process moves it.

        Returns:
          The new path of the folder, or ``None`` if there was nothing to move (or this
          process is not the primary).
        """
        src = self.path(step)
        if not self.primary:
            return None
        stem = f"{_CORRUPT}{int(step)}"
        dst = _move_aside(src, lambda n: self.directory / (stem if n == 1 else f"{stem}-{n}"))
        if dst is not None:
            warnings.warn(f"{reason}; moved {src} aside to {dst}", stacklevel=2)
        return dst

    def latest_valid_step(self) -> int | None:
        """The newest step that passes :meth:`verify` (warning about each one that does not)."""
        for step in reversed(self.steps()):
            try:
                self.verify(step)
                return step
            except CheckpointCorruptError as e:
                warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
        return None

    # -------------------------------------------------------------------- save / restore
    def save(self, step: int, tree: Any, *, metadata: dict | None = None) -> Path:
        """Writes ``tree`` (and JSON ``metadata``) as checkpoint ``step``, atomically.

        Returns:
          The path of the new checkpoint.

        Raises:
          ValueError: if ``step`` is negative or a good checkpoint of that step already
            exists (a damaged one is moved aside, see :meth:`quarantine`, and replaced).
          TypeError: if ``metadata`` is not JSON-serialisable.
        """
        import orbax.checkpoint as ocp

        step = int(step)
        if step < 0:
            raise ValueError(f"{step=} must be >= 0")
        final = self.path(step)
        if final.exists():
            try:
                self.verify(step)
            except CheckpointCorruptError as e:  # a damaged one: replaced by this save
                self.quarantine(step, f"{e}; saving over it")
            else:
                raise ValueError(f"checkpoint {final} already exists")
        meta_json = json.dumps(metadata or {})  # fail before writing anything
        tmp = self.directory / f".tmp-{step}-{_shared_token()}"
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / "state", _to_storable(tree))
        ckptr.wait_until_finished()
        if self.primary:
            files = {
                str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": _sha256(f)}
                for f in _files(tmp)
            }
            manifest = {"step": step, "files": files, "metadata": json.loads(meta_json)}
            mtmp = tmp / (_MANIFEST + ".part")
            with open(mtmp, "wb") as fh:
                fh.write(_manifest_bytes(manifest))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(mtmp, tmp / _MANIFEST)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        if jax.process_count() > 1:  # the others return once the checkpoint is in place
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"cljax-checkpoint-save-{step}")
        return final

    def _prune(self) -> None:
        steps = self.steps()
        valid = []
        for s in reversed(steps):
            if len(valid) >= self.keep:
                break
            try:
                self.verify(s)
                valid.append(s)
            except CheckpointCorruptError:
                pass
        for s in steps:
            if s not in valid and s < max(valid, default=-1):
                shutil.rmtree(self.path(s), ignore_errors=True)

    def restore(self, step: int, target: Any, *, allow_cast: bool = False) -> tuple[Any, dict]:
        """Restores checkpoint ``step`` into the structure (and shardings) of ``target``.

        ``target`` is a pytree of arrays or ``jax.ShapeDtypeStruct`` (with ``sharding`` to
        restore onto the current mesh, whatever mesh saved it).

        Args:
          step: the checkpoint to restore.
          target: the tree whose structure, shapes, dtypes and shardings the result takes.
          allow_cast: convert leaves stored in another dtype than ``target``'s (float32 stored,
            bfloat16 wanted); by default that is an error, since a silent cast (float32 to
            int32, say) loses the values.

        Returns:
          ``(tree, metadata)``.

        Raises:
          CheckpointCorruptError: if verification fails, or orbax cannot read a checkpoint
            that the manifest vouches for (damage the manifest cannot see).
          ValueError: if the checkpoint does not fit ``target`` (other leaf names or
            shapes), or a leaf is stored in another dtype and ``allow_cast`` is false (the
            message names the first such leaves).
        """
        import orbax.checkpoint as ocp

        manifest = self.verify(step)
        storable = _to_storable(target)
        abstract = jax.tree.map(
            lambda x: (
                x if isinstance(x, jax.ShapeDtypeStruct) else ocp.utils.to_shape_dtype_struct(x)
            ),
            storable,
        )
        renamed = self._check_fit(step, abstract, allow_cast)
        try:
            with ocp.StandardCheckpointer() as ckptr:
                if renamed:
                    restored = _restore_renamed(ckptr, self.path(step) / "state", abstract)
                else:
                    restored = ckptr.restore(self.path(step) / "state", abstract)
        except Exception as e:  # the stored tree fits the target: the data is damaged
            raise CheckpointCorruptError(
                f"checkpoint {self.path(step)} cannot be read: {type(e).__name__}: {_short(e)}"
            ) from e
        return _from_storable(restored, target), manifest.get("metadata", {})

    def _check_fit(self, step: int, abstract: Any, allow_cast: bool) -> bool:
        """Compares the stored tree of checkpoint ``step`` with ``abstract``.

        Returns whether the stored tree fits only under the old names of
        :data:`_RENAMED_FIELDS` (a checkpoint written before a field was renamed).

        Raises:
          CheckpointCorruptError: if the stored tree's metadata cannot be read.
          ValueError: if the leaf names or shapes differ, or (without ``allow_cast``) a dtype.
        """
        import numpy as np
        import orbax.checkpoint as ocp

        root = self.path(step)
        try:
            meta = ocp.StandardCheckpointer().metadata(root / "state")
            tree = getattr(meta, "item_metadata", meta)  # a StepMetadata in newer orbax
            tree = getattr(tree, "tree", tree)
            stored = {
                m.name: m
                for m in jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "dtype"))
                if hasattr(m, "name") and getattr(m, "dtype", None) is not None
            }
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise CheckpointCorruptError(
                f"checkpoint {root}: cannot read the stored tree: {type(e).__name__}: {_short(e)}"
            ) from e
        names = jax.tree.leaves(ocp.tree.get_param_names(abstract, include_empty_nodes=False))
        leaves = jax.tree.leaves(abstract)
        renamed = False
        if stored:
            missing = [n for n in names if n not in stored]
            extra = sorted(set(stored) - set(names))
            old = {_old_name(n): n for n in missing}
            if missing and sorted(old) == extra:  # only renamed fields differ
                stored = {old.get(n, n): m for n, m in stored.items()}
                missing, extra, renamed = [], [], True
            if missing or extra:
                raise ValueError(
                    f"checkpoint {root} does not fit the target tree: leaves missing from "
                    f"the checkpoint: {missing[:3]}; leaves not in the target: {extra[:3]}"
                )
        bad_shape = [
            f"{n!r} is stored with shape {tuple(stored[n].shape)}, the target has {tuple(x.shape)}"
            for n, x in zip(names, leaves, strict=True)
            if n in stored
            and getattr(stored[n], "shape", None) is not None
            and tuple(stored[n].shape) != tuple(x.shape)
        ]
        if bad_shape:
            raise ValueError(f"checkpoint {root} does not fit the target tree: {bad_shape[0]}")
        if allow_cast:
            return renamed
        bad = [
            f"{n!r} is stored as {np.dtype(stored[n].dtype)}, the target has {np.dtype(x.dtype)}"
            for n, x in zip(names, leaves, strict=True)
            if n in stored and np.dtype(stored[n].dtype) != np.dtype(x.dtype)
        ]
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(
                f"checkpoint {root}: {'; '.join(bad[:3])}{more}; pass allow_cast=True to convert"
            )
        return renamed

    def restore_latest(
        self, target: Any, *, allow_cast: bool = False
    ) -> tuple[int, Any, dict] | None:
        """Restores the newest good checkpoint, or returns ``None`` if there is none.

        A checkpoint that fails verification or cannot be read is named in a warning and
        moved aside (:meth:`quarantine`); the previous one is tried, and with none left the
        result is ``None`` (start over). A checkpoint that does not fit ``target`` (see
        :meth:`restore`) is skipped likewise if an older one fits (the newer one is then
        damaged); if none fits, that error is raised and nothing is moved: the target is
        wrong, not the checkpoints.

        Args:
          target: as in :meth:`restore`.
          allow_cast: as in :meth:`restore`.

        Returns:
          ``(step, tree, metadata)`` or ``None``.

        Raises:
          ValueError: if no checkpoint restores and the newest does not fit ``target``.
        """
        misfits: list[tuple[int, ValueError]] = []
        for step in reversed(self.steps()):
            try:
                tree, meta = self.restore(step, target, allow_cast=allow_cast)
            except CheckpointCorruptError as e:
                self.quarantine(step, f"{e}; falling back to the previous checkpoint")
                continue
            except ValueError as e:
                misfits.append((step, e))
                continue
            for bad, e in misfits:  # an older checkpoint fits: the newer ones are damaged
                self.quarantine(bad, f"{e}, but checkpoint {step} fits")
            return step, tree, meta
        if misfits:
            raise misfits[0][1]
        return None


# ------------------------------------------------------------------------- run files


def _move_aside(src: Path, aside: Callable[[int], Path]) -> Path | None:
    """Renames ``src`` to the first free ``aside(n)``, n = 1, 2, ... (the module's one move).

    The rename is atomic and the parent folder is synced, so the damaged file or folder is
    either in place or aside after a crash, never lost. Returns the new path, or ``None``
    when there is nothing to move (no ``src``, or another process moved it first).
    """
    if not src.exists():
        return None
    n = 1
    while (dst := aside(n)).exists():
        n += 1
    try:
        os.replace(src, dst)
    except OSError:
        if not src.exists():  # another process moved it
            return None
        raise
    _fsync_dir(src.parent)
    return dst


def quarantine_file(
    path: str | os.PathLike,
    reason: str = "damaged",
    *,
    primary: bool | None = None,
    stacklevel: int = 1,
) -> Path | None:
    """Moves a damaged file aside to ``<name>.corrupt-<n>`` beside it, with a warning.

    The counterpart of :meth:`CheckpointManager.quarantine` for single files (run records,
    caches): the file is renamed, never deleted, and ``n`` is the first number not taken, so
    repeated damage keeps every copy. Only the primary process (process 0 unless
    ``primary`` says otherwise) moves anything.

    Args:
      path: the damaged file.
      reason: what is wrong with it, for the warning.
      primary: whether this process moves files (default:
        :func:`cljax.sharding.is_primary`).
      stacklevel: the frame the warning names, counted from the caller of this function
        (1: the caller; 2: its caller, for a reader that quarantines on its caller's behalf).

    Returns:
      The new path, or ``None`` if nothing was moved (no such file, or not the primary).
    """
    src = Path(path)
    if not (is_primary() if primary is None else primary):
        return None
    dst = _move_aside(src, lambda n: src.with_name(f"{src.name}{_CORRUPT}{n}"))
    if dst is not None:
        warnings.warn(f"{src}: {reason}; moved it aside to {dst}", stacklevel=stacklevel + 1)
    return dst


def _json_body(obj: Any) -> str:
    """The canonical text of ``obj`` (numpy scalars as floats, keys as JSON has them)."""
    return json.dumps(obj, indent=2, default=float)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes a run record: JSON with its own SHA-256, atomically and durably.

    The file is ``{"sha256": <hex>, "data": <obj>}``, the hash taken over the canonical
    text of ``obj``, so :func:`load_json` detects truncation and altered bytes alike
    (also those that leave valid JSON, such as a changed digit). It is written to a
    temporary file, flushed to disk and renamed into place: a crash leaves the old record
    or the new one.

    Args:
      path: the file (its folder is created).
      obj: JSON-serialisable data; numpy scalars are stored as floats.

    Raises:
      TypeError: if ``obj`` is not JSON-serialisable (nothing is written).
    """
    path = Path(path)
    data = json.loads(_json_body(obj))  # as it reads back: tuples as lists, keys as strings
    body = _json_body(data)
    digest = hashlib.sha256(body.encode()).hexdigest()
    text = '{"sha256": "' + digest + '", "data": ' + body + "}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _parse_record(raw: bytes) -> Any:
    """The data of a record written by :func:`save_json`; ``ValueError`` if it is damaged."""
    record = json.loads(raw.decode("utf-8"))
    if not (isinstance(record, dict) and set(record) == {"sha256", "data"}):
        raise ValueError("it is not a checksummed record (truncated, altered or foreign)")
    if hashlib.sha256(_json_body(record["data"]).encode()).hexdigest() != record["sha256"]:
        raise ValueError("its checksum does not match (altered)")
    return record["data"]


def load_json(path: str | os.PathLike, *, primary: bool | None = None) -> Any | None:
    """Reads a run record written by :func:`save_json`; ``None`` if it is missing or damaged.

    A record that cannot be read, is not valid JSON, or does not match its checksum is
    named in a warning and moved aside (:func:`quarantine_file`), and ``None`` tells the
    caller to compute it again, so a damaged file never stops a run for good.

    Args:
      path: the record.
      primary: passed to :func:`quarantine_file`.

    Returns:
      The data stored, or ``None``.

    Example::

      done = load_json(out / "runs" / "a.json")
      if done is None:
          done = run_a()
          save_json(out / "runs" / "a.json", done)
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:  # a folder in its place, unreadable, ...
        quarantine_file(path, f"unreadable ({_short(e)})", primary=primary, stacklevel=2)
        return None
    try:
        return _parse_record(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        quarantine_file(path, f"damaged run record: {_short(e)}", primary=primary, stacklevel=2)
        return None
