"""Reading and writing safetensors one tensor at a time.

Inputs are read with plain positioned reads instead of `safe_open`: a memory map keeps
every page it has touched resident (and counted in RSS) until it is closed, so reading a
whole model through one costs the model's size in memory. A positioned read costs only
the tensor at hand; the file's pages stay in the kernel's page cache.

Outputs are written as a stream: every tensor's name, dtype and shape are known before
the first byte (they are the base model's), so a shard's header is written first and the
tensors follow in order as they are computed. Nothing holds a whole model in memory.

Tensors are numpy arrays of their stored bits. numpy has no bfloat16 (nor float8), so
those are held as unsigned integers of the same width, and `to_float32`/`from_float32`
convert exactly as torch does (bfloat16: widening is exact, narrowing rounds to nearest
even). numpy rather than torch keeps `behaviorc merge` free of torch's import, which
alone costs more than a whole merge of a 125M-parameter model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from behaviorc.core.files import remembered_sha256
from behaviorc.core.diagnostics import BehaviorError

# How each safetensors dtype is held in numpy.
STORAGE: dict[str, np.dtype] = {name: np.dtype(kind) for name, kind in {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}.items()}
# The dtypes a task vector can live in (arithmetic on them is meaningful), by torch's name.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_BFLOAT16_NAN = 0x7FC0

# Parameters larger than this are read, merged and written in blocks of rows (16 MB each
# in float32), so memory does not grow with the largest parameter.
BLOCK_ENTRIES = 1 << 22
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # the safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def row_entries(self) -> int:
        """Entries in one row of the first dimension (the one entry of a scalar)."""
        return self.numel // self.shape[0] if self.shape else 1

    def nbytes_of(self, rows: tuple[int, int] | None) -> int:
        """Bytes of rows [start, stop) of the first dimension; of the whole tensor for None."""
        return self.nbytes if rows is None else (rows[1] - rows[0]) * (self.nbytes // self.shape[0])


def row_blocks(info: TensorInfo) -> list[tuple[int, int] | None]:
    """Row ranges [start, stop) of at most BLOCK_ENTRIES entries each (at least one row);
    [None], the whole tensor, when it is that small or has no rows to split."""
    if info.numel <= BLOCK_ENTRIES or len(info.shape) < 2:
        return [None]
    rows = info.shape[0]
    step = max(1, BLOCK_ENTRIES // info.row_entries)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def to_float32(stored: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored float values (of safetensors dtype `dtype`) as float32, in `out` if given.
    Exact from bfloat16 and float16; float64 rounds to nearest, as torch's cast."""
    if out is None:
        out = np.empty(stored.shape, np.float32)
    if dtype == "BF16":
        # A bfloat16 is the upper half of the float32 with the same value.
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, stored, casting="same_kind")
    return out


def computable(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored float values numpy can compute with: bfloat16 (stored as uint16) widened to
    float32, exactly; every other float dtype as stored."""
    return to_float32(stored, dtype) if dtype == "BF16" else stored


def from_float32(values: np.ndarray, dtype: str, out: np.ndarray | None = None,
                 scratch: np.ndarray | None = None) -> np.ndarray:
    """float32 values as stored in safetensors dtype `dtype` (a float dtype), rounded to
    nearest even as torch's cast rounds, in `out` if given. To bfloat16 `values` serve
    as scratch (they are overwritten), and so does `scratch` if given (uint32, their
    shape)."""
    if out is None:
        out = np.empty(values.shape, STORAGE[dtype])
    if dtype != "BF16":
        with np.errstate(over="ignore"):  # beyond float16's range is inf, as in torch
            np.copyto(out, values, casting="same_kind")
        return out
    with np.errstate(invalid="ignore", over="ignore"):  # (a NaN sum is all this asks)
        not_a_number = np.isnan(values) if math.isnan(np.add.reduce(values, axis=None)) else None
    # Adding 0x7FFF plus the lowest kept bit, then dropping the low half, rounds to
    # nearest with ties to even (a carry into the exponent gives inf, as it should).
    bits = values.view(np.uint32)
    lowest_kept = np.right_shift(bits, 16, out=scratch)
    np.bitwise_and(lowest_kept, 1, out=lowest_kept)
    lowest_kept += 0x7FFF
    bits += lowest_kept
    np.copyto(out, np.right_shift(bits, 16, out=lowest_kept), casting="unsafe")
    if not_a_number is not None:
        out[not_a_number] = _BFLOAT16_NAN
    return out


class SafetensorsFile:
    """One .safetensors file: its header parsed, its tensors read on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._handle: BinaryIO = open(self.path, "rb")
        except FileNotFoundError:
            raise BehaviorError(f"no such file: {self.path}") from None
        except OSError as err:
            raise BehaviorError(f"cannot read {self.path}: {err.strerror}") from None
        try:
            self.metadata, self.tensors = self._read_header()
        except BaseException:
            self._handle.close()
            raise

    def _read_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        """The header, checked against the file's size: truncation, a corrupt header and
        unknown dtypes are found without reading a tensor."""
        size = os.fstat(self._handle.fileno()).st_size
        raw_length = self._handle.read(8)
        if len(raw_length) < 8:
            raise self._problem(f"is truncated: {size} bytes, not even a header")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(_MAX_HEADER_BYTES, size - 8):
            raise self._problem(f"is truncated or corrupt: its header claims {header_length} "
                                f"bytes, the file has {size}")
        try:
            header = json.loads(self._handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._problem("is corrupt: its header is not JSON") from None
        if not isinstance(header, dict):
            raise self._problem("is corrupt: its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start = 8 + header_length
        tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            try:
                dtype = entry["dtype"]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._problem(f"is corrupt: bad header entry for `{name}`") from None
            if dtype not in STORAGE:
                raise self._problem(f"has tensor `{name}` of unknown dtype `{dtype}`")
            info = TensorInfo(name, dtype, shape, self.path, data_start + begin, end - begin)
            if begin < 0 or info.nbytes != info.numel * STORAGE[dtype].itemsize:
                raise self._problem(f"is corrupt: tensor `{name}` has the wrong byte size")
            if data_start + end > size:
                raise self._problem(f"is truncated: tensor `{name}` needs {end} data bytes, "
                                    f"the file holds {size - data_start}",
                                    hint="copy or download the file again")
            tensors[name] = info
        return {str(k): str(v) for k, v in metadata.items()}, tensors

    def _problem(self, what: str, hint: str | None = None) -> BehaviorError:
        return BehaviorError(f"`{self.path}` {what}", hint=hint)

    def read(self, name: str, rows: tuple[int, int] | None = None,
             into: np.ndarray | None = None) -> np.ndarray:
        """The stored values: the whole tensor, or rows [start, stop) of its first
        dimension. `into`, a byte buffer at least that large, is filled and viewed instead
        of a fresh array (reusing buffers spares the page faults of fresh memory)."""
        info = self.tensors[name]
        shape, offset, nbytes = info.shape, info.offset, info.nbytes_of(rows)
        if rows is not None:
            shape = (rows[1] - rows[0], *info.shape[1:])
            offset += info.nbytes_of((0, rows[0]))
        buffer = np.empty(nbytes, np.uint8) if into is None else into[:nbytes]
        view = memoryview(buffer)
        done = 0
        while done < nbytes:
            got = os.preadv(self._handle.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise self._problem(f"is truncated: the file ends inside tensor `{name}`")
            done += got
        return buffer.view(STORAGE[info.dtype]).reshape(shape)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WeightFolder:
    """The weights of a Hugging Face model folder: `model.safetensors`, or shards named by
    `model.safetensors.index.json`. Tensor names are checkpoint names."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise BehaviorError(f"model folder not found: {self.path}")
        index = self.path / INDEX_FILE
        if index.is_file():
            shard_names = sorted(set(_read_index(index).values()))
        elif (self.path / SINGLE_FILE).is_file():
            shard_names = [SINGLE_FILE]
        else:
            raise BehaviorError(
                f"{self.path} has no safetensors weights",
                hint=f"a model folder needs {SINGLE_FILE} or {INDEX_FILE} with its shards")
        self.files: list[SafetensorsFile] = []
        self.tensors: dict[str, TensorInfo] = {}
        try:
            for shard in shard_names:
                opened = SafetensorsFile(self.path / shard)
                self.files.append(opened)
                self.tensors.update(opened.tensors)
        except BaseException:
            self.close()
            raise
        self._file_of = {name: f for f in self.files for name in f.tensors}

    def read(self, name: str, rows: tuple[int, int] | None = None,
             into: np.ndarray | None = None) -> np.ndarray:
        return self._file_of[name].read(name, rows, into)

    def close(self) -> None:
        for opened in self.files:
            opened.close()

    def __enter__(self) -> "WeightFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BehaviorError(f"{index}: not a safetensors index ({err})") from None
    if not isinstance(weight_map, dict):
        raise BehaviorError(f"{index}: `weight_map` is not an object")
    return weight_map


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = STORAGE[self.dtype].itemsize
        for size in self.shape:
            count *= size
        return count


class StreamWriter:
    """Writes planned tensors, in plan order, into one or more safetensors files.

    `shards` is a list of (file name, tensors) in the order they are written; a header
    is written when its shard is reached. `write` checks each tensor against the plan,
    so a bug cannot produce a file whose header lies about its data. With `hashed`, each
    file's sha256 is computed as it is written (`sha256`).
    """

    def __init__(self, folder: Path, shards: list[tuple[str, list[PlannedTensor]]],
                 metadata: dict[str, str], hashed: bool = True):
        self.folder = folder
        self._metadata = {"format": "pt", **metadata}
        self._pending: Iterator[tuple[str, list[PlannedTensor]]] = iter(shards)
        self._queue: list[PlannedTensor] = []
        self._handle: BinaryIO | None = None
        self._file_name = ""
        self._hashed = hashed
        self._digest = hashlib.sha256()
        self.sha256: dict[str, str] = {}  # file name -> hash of its bytes, once written

    def write(self, name: str, parts: np.ndarray | Iterable[np.ndarray]) -> None:
        """Write the next planned tensor (stored values), whole or as consecutive row
        blocks."""
        if not self._queue:
            self._open_next_shard()
        planned = self._queue.pop(0)
        if planned.name != name:
            raise AssertionError(f"tensor {name} written where {planned.name} was planned")
        written = 0
        for part in [parts] if isinstance(parts, np.ndarray) else parts:
            if part.dtype != STORAGE[planned.dtype] or (
                    part.ndim > 1 and tuple(part.shape[1:]) != planned.shape[1:]):
                raise AssertionError(f"a part of {name} does not match the planned {planned}")
            self._put(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
            written += part.nbytes
        if written != planned.nbytes:
            raise AssertionError(f"{written} bytes written for {planned}")
        if not self._queue:
            self._finish_shard()

    def _put(self, data: np.ndarray | bytes) -> None:
        assert self._handle is not None
        self._handle.write(data)
        if self._hashed:
            self._digest.update(data)

    def _open_next_shard(self) -> None:
        file_name, tensors = next(self._pending)
        header: dict[str, object] = {"__metadata__": self._metadata}
        offset = 0
        for planned in tensors:
            header[planned.name] = {"dtype": planned.dtype, "shape": list(planned.shape),
                                    "data_offsets": [offset, offset + planned.nbytes]}
            offset += planned.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        self._handle = open(self.folder / file_name, "wb")
        self._file_name = file_name
        self._digest = hashlib.sha256()
        self._put(struct.pack("<Q", len(encoded)))
        self._put(encoded)
        self._queue = list(tensors)

    def _finish_shard(self) -> None:
        assert self._handle is not None
        self._handle.close()
        self._handle = None
        if self._hashed:
            self.sha256[self._file_name] = self._digest.hexdigest()

    def close(self) -> None:
        """Closes an unfinished file (after a failure; the caller discards the folder)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        """Checks that every planned tensor was written; writes shards planned empty."""
        if self._queue:
            raise AssertionError(f"{len(self._queue)} planned tensors were never written")
        for file_name, tensors in self._pending:
            if tensors:
                raise AssertionError(f"shard {file_name} was never written")
            self._pending = iter([(file_name, tensors)])
            self._open_next_shard()
            self._finish_shard()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int | None
                ) -> list[tuple[str, list[PlannedTensor]]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own). One shard is named `model.safetensors`."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for planned in tensors:
        if max_shard_bytes is not None and groups[-1] and size + planned.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(planned)
        size += planned.nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    count = len(groups)
    return [(f"model-{i + 1:05d}-of-{count:05d}.safetensors", group)
            for i, group in enumerate(groups)]


def write_index(folder: Path, shards: list[tuple[str, list[PlannedTensor]]]) -> None:
    """The index file transformers and vLLM read for sharded weights (none for one shard)."""
    if len(shards) == 1:
        return
    total = sum(p.nbytes for _, group in shards for p in group)
    weight_map = {p.name: file_name for file_name, group in shards for p in group}
    (folder / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def sha256_files(paths: Iterable[Path]) -> str:
    """One hash over several files, each contributing its name and its content hash."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(f"{path.name}\0{remembered_sha256(path)}\n".encode())
    return digest.hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a task-vector file, or over a model folder's config and weight files."""
    path = Path(path)
    if path.is_file():
        return remembered_sha256(path)
    files = [p for p in path.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("config.json", INDEX_FILE))]
    return sha256_files(files)
