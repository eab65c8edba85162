"""Atomic file writes: a killed process never leaves a half-written artifact behind. Deterministic bytes: the same
content always gives the same file (sorted JSON keys, `write_safetensors`' sorted header), so DVC sees a rerun with
the same inputs as unchanged.

Every artifact write goes through `atomic_path`: the content is written to a temporary next to the target and
renamed over it only when complete. A failed write (an exception, a full disk) removes its temporary and leaves
the previous version intact; what a SIGKILLed writer left behind (its temporary, or a directory moved aside but not
yet replaced) is cleaned up or put back by the next write of that target (`recover`). Under data-parallel training
only rank 0 may write (dpoflow.runtime.distributed): any other rank raises instead of racing it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dpoflow.runtime.distributed import current_rank


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(target: str | os.PathLike) -> None:
    """Undo what a killed writer of `target` left: put back a directory it had moved aside (`.<name>.old`, the
    last complete version) if `target` is missing, and remove its temporaries (`.<name>.*.tmp`)."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        os.rename(old, target)
    parent, name, rnd = glob.escape(str(target.parent)), glob.escape(target.name), "?" * 8  # mkdtemp's 8 characters
    for pattern in (f".{name}.{rnd}.tmp", f"..{name}.{rnd}.tmp.{rnd}.tmp"):  # its own, and those of a nested write
        for stale in glob.glob(os.path.join(parent, pattern)):
            shutil.rmtree(stale) if os.path.isdir(stale) and not os.path.islink(stale) else os.unlink(stale)


def _check_writer(target: Path) -> None:
    if current_rank() != 0:
        raise RuntimeError(
            f"{target}: rank {current_rank()} tried to write it; under data-parallel training only "
            "rank 0 writes artifacts (dpoflow.runtime.distributed.is_main_process)"
        )


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it over `target` only if the block succeeds.

    Works for files and directories. On error (a full disk included) the temporary is removed and the old target
    is untouched; the error gets a note naming the target.
    """
    target = Path(target)
    _check_writer(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()  # the caller creates a file or a directory at this path
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if tmp.is_file():
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except Exception as err:
        err.add_note(f"while writing {target}: nothing was replaced (the previous version, if any, is intact)")
        raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows a stage wrote with `write_jsonl`; a broken line raises ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
    return rows


SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "uint64": "U64",
    "int64": "I64",
    "float64": "F64",
}


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of numpy `arrays`, byte-deterministic: tensors in sorted name order, header JSON with
    sorted keys and no spaces, padded with spaces to 8 bytes (safetensors' own writer puts `__metadata__` in hash
    order, so two saves of the same arrays differ). Format: u64 little-endian header length, header
    {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        dtype = SAFETENSORS_DTYPES.get(array.dtype.name)
        if dtype is None:
            raise TypeError(
                f"write_safetensors: {name!r} has dtype {array.dtype}, not one of {sorted(SAFETENSORS_DTYPES)}"
            )
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_safetensors(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write numpy arrays as a byte-deterministic safetensors file (`safetensors_bytes`), atomically."""
    data = safetensors_bytes(arrays, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_hash(*paths: str | os.PathLike) -> str:
    """sha256 over the files (recursively for folders): file paths and contents. For resume fingerprints."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                digest.update(str(f).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def json_safe(value: Any) -> Any:
    """A value JSON can hold and a gate can read: NaN/Inf -> None (read as a failed check), numpy scalars ->
    Python numbers, tuples -> lists; recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy (or mlx) scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def headline(detail: Mapping[str, Any], keys: Iterable[str] | Mapping[str, str]) -> dict[str, int | float]:
    """The flat numbers a person compares (a stage's metrics file), picked from the stage's `detail`: `keys` names
    them by their dotted path in `detail` (`train.loss` is stored as `train_loss`), or maps metric name -> dotted
    path where a name must differ from the detail's (names are unique across the metrics files, so `dvc exp show`
    can print them bare). Booleans become 0/1; a value the run did not produce is left out; anything that is not a
    number (prose, lists, hashes) is refused: it belongs in the report."""
    named = keys.items() if isinstance(keys, Mapping) else ((key.replace(".", "_"), key) for key in keys)
    out: dict[str, int | float] = {}
    for name, dotted in named:
        value: Any = detail
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        value = json_safe(value)
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            raise TypeError(f"metric {name!r} is {type(value).__name__}, not a number: keep it in the report")
        out[name] = value
    return out
