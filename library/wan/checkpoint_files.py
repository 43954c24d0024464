"""Reading checkpoint files tensor by tensor: safetensors (single or sharded) and torch `.pth`.

Everything here is about bytes on disk, not about WAN: open a path, list its tensors with shapes and
dtypes from the headers alone, and read one tensor at a time. Safetensors are memory-mapped privately
(copy-on-write) and tensors are zero-copy views of the mapping: a model loaded in the file's dtype costs
the file's pages once (page cache, reclaimable), never a second anonymous copy. A tensor converted to
another dtype or device is `release`d so its mapped pages do not stay resident beside the copy.
`.pth` files go through `torch.load(weights_only=True)` (memory-mapped when zipped): no arbitrary
unpickling; `checkpoint_pickle.py` says why a file was refused. A damaged file of either kind is a
`CheckpointError` naming it, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Iterator

import torch

from library.errors import UserError

from .checkpoint_pickle import PICKLE_PROTO, ZIP_MAGIC, pickle_failure

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit what was asked; the message says what to do."""


def _entry_problem(name, entry) -> str | None:
    """What is wrong with one tensor entry of a safetensors header, or None."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"tensor {name!r} has {'unsupported dtype ' + repr(dtype) if dtype else 'no dtype'}"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"tensor {name!r} has an invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"tensor {name!r} has invalid data offsets {offsets!r}"
    size = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[entry["dtype"]]).element_size()
    if offsets[1] - offsets[0] != size:
        return f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but its shape {shape} needs {size}"
    return None


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """The parsed, checked JSON header of a safetensors file and its length in bytes."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            what = "is empty (0 bytes)" if size == 0 else f"is {size} bytes"
            raise CheckpointError(f"{path}: {what}, too short to be a safetensors file; the download or copy did not "
                                  "finish, fetch the file again")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: not a safetensors file, or truncated (header length {header_len} for a {size}-byte "
                "file); re-download or re-export it"
            )
        if header_len > _MAX_HEADER:
            raise CheckpointError(f"{path}: its header claims {header_len:,} bytes, over the limit of "
                                  f"{_MAX_HEADER:,} (a real model's header is a few MB): the file is damaged or "
                                  "not a model; re-download or re-export it")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise CheckpointError(f"{path}: unreadable safetensors header ({reason}); the file is damaged: re-download "
                                  "or re-export it") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a table of tensors; the file is damaged: "
                              "re-download or re-export it")
    problems = [p for name, entry in header.items() if name != "__metadata__" and (p := _entry_problem(name, entry))]
    if problems:
        raise CheckpointError(f"{path}: damaged safetensors header: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                              + "; re-download or re-export the file")
    return header, header_len


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        header, header_len = _read_header(self.path, size)
        self.metadata: dict = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self._entries: dict = header
        self._data_start = 8 + header_len
        self._map: mmap.mmap | None = None
        need = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + need > size:
            raise CheckpointError(
                f"{self.path}: truncated: the header promises {self._data_start + need} bytes but the file "
                f"has {size}; the download or copy did not finish, fetch the file again"
            )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entries[key]["dtype"]]

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as f:
                # private and writable: tensors may be modified in place (copy-on-write), never the file
                self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        return self._map

    def read(self, key: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the memory-mapped file (file-backed pages, no second copy)."""
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        if end == start:
            return torch.empty(self.shape(key), dtype=self.dtype(key))
        raw = torch.frombuffer(self._mapping(), dtype=torch.uint8, count=end - start, offset=self._data_start + start)
        return raw.view(self.dtype(key)).reshape(self.shape(key))

    def span(self, key: str) -> tuple[int, int]:  # (byte offset in the file, byte count): for streamed reads
        start, end = self._entries[key]["data_offsets"]
        return self._data_start + start, end - start

    def release(self, key: str) -> None:
        """Drop the mapped pages of a tensor that has been copied elsewhere (keeps peak RSS at one copy)."""
        if self._map is None:
            return
        start, end = (self._data_start + o for o in self._entries[key]["data_offsets"])
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _load_pickle(path: Path):
    """torch.load with weights_only (memory-mapped for zip files); every failure a clear CheckpointError."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: is empty (0 bytes); the download or copy did not finish, fetch the file "
                              "again")
    zipped = head == ZIP_MAGIC
    if not zipped and head[0] != PICKLE_PROTO:
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle: it starts with "
                              f"bytes {head.hex(' ')}); the file is damaged or not a model: download it again")
    try:  # legacy (non-zip) pickles cannot be memory-mapped; still weights_only
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the refusal below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or hostile file makes torch raise
        raise CheckpointError(f"{path}: {pickle_failure(path, exc, zipped)}") from None


class PickleCheckpoint:
    """A torch `.pth`/`.pt`/`.bin` state dict, loaded memory-mapped with `weights_only=True`: a pickle that
    would import anything but tensors is refused, never run."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        obj = _load_pickle(self.path)
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
            raise CheckpointError(f"{self.path}: does not hold a flat state dict of named tensors, so it is not a "
                                  "model file we can read; pass the model's weights file")
        self._tensors: dict[str, torch.Tensor] = obj
        self.metadata: dict = {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def release(self, key: str) -> None:
        """Nothing to do: torch's own mapping of the archive is dropped with the last reference."""


class Checkpoint:
    """A uniform view over one file or a sharded set: `keys()`, `shape(k)`, `dtype(k)`, `read(k)`."""

    def __init__(self, files: list, source: Path):
        self.source = source
        self.files = files
        self._owner = {}
        for f in files:
            for key in f.keys():
                self._owner.setdefault(key, f)
        self.metadata = {k: v for f in files for k, v in f.metadata.items()}

    def keys(self) -> list[str]:
        return list(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def shape(self, key: str) -> tuple[int, ...]:
        return self._owner[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._owner[key].dtype(key)

    def read(self, key: str) -> torch.Tensor:
        return self._owner[key].read(key)

    def release(self, key: str) -> None:
        self._owner[key].release(key)

    def file_of(self, key: str) -> Path:
        return self._owner[key].path

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._owner:
            yield key, self.read(key)

    def total_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)


def _open_file(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return PickleCheckpoint(path)
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path}: GGUF files are not supported; use the safetensors release of the model")
    raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r} (expected .safetensors or .pth)")


def _open_index(index: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({type(exc).__name__}: {exc}); restore the "
                              "index that came with the shards") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and Path(v).name == v
                                                   for v in weight_map.values()):
        raise CheckpointError(f"{index}: `weight_map` must map tensor names to shard file names in this folder; "
                              "restore the index that came with the shards")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index.parent}: shard(s) {', '.join(missing)} listed in {index.name} are missing; "
            "download every shard of the model into this folder"
        )
    files = [_open_file(index.parent / s) for s in shards]
    ckpt = Checkpoint(files, index)
    lost = [k for k, s in weight_map.items() if k not in ckpt]
    if lost:
        raise CheckpointError(f"{index}: {len(lost)} tensors named in the index are absent from the shards, "
                              f"e.g. {lost[:3]}; download every shard of the model again")
    return ckpt


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a file, or a folder holding one checkpoint file or a shard index (`*.index.json`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; check the path")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _open_index(path)
        return Checkpoint([_open_file(path)], path)
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several shard indexes ({', '.join(i.name for i in indexes)}); pass one of them")
    files = sorted(path.glob("*.safetensors")) or sorted(p for p in path.glob("*.pth"))
    if len(files) == 1:
        return Checkpoint([_open_file(files[0])], files[0])
    if not files:
        raise CheckpointError(f"{path}: folder holds no .safetensors or .pth checkpoint")
    raise CheckpointError(
        f"{path}: {len(files)} checkpoint files and no shard index (*.safetensors.index.json); "
        "pass the file you mean, or restore the index that came with the shards"
    )


def fingerprint(path: str | os.PathLike, sample: int = 1 << 20) -> tuple | None:
    """(size, hash of the first and last `sample` bytes) of a checkpoint file, or of each checkpoint file
    in a folder: equal for copies of one model, different for two models with the same layout (the two
    WAN 2.2 experts share their headers, not their weights). Reads at most 2 MiB a file; None when the
    path is neither."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth")) if path.is_dir() else [path]
    prints = []
    for file in files:
        if not file.is_file():
            return None
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(sample)
            f.seek(max(0, size - sample))
            prints.append((file.suffix, size, hashlib.sha256(head + f.read(sample)).hexdigest()))
    return tuple(prints) or None


# ---- writing ---------------------------------------------------------------------------------------------

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, tensors, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file one tensor at a time, atomically (a temp file beside it, then a rename).

    `tensors` is a mapping or an iterable of (name, tensor) pairs; a value may also be a `LazyTensor`
    (shape and dtype up front, values made when written), so a caller can produce each tensor (cast,
    merged, copied off the GPU) only when it is written and a multi-GiB model never exists twice in host
    memory. Tensors on an accelerator are copied to the host one at a time. Entries keep their order. A
    failure leaves any earlier file at `path` untouched.
    """
    path = Path(path)
    items = list(tensors.items() if hasattr(tensors, "items") else tensors)
    specs, offset = {}, 0
    for name, value in items:
        shape, dtype = _spec_of(name, value)
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        specs[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = dict(specs)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, value in items:
                tensor = value.tensor() if isinstance(value, LazyTensor) else value
                tensor = tensor.detach().to("cpu").contiguous()
                spec = specs[name]
                if tuple(tensor.shape) != tuple(spec["shape"]) or _DTYPE_NAMES[tensor.dtype] != spec["dtype"]:
                    raise CheckpointError(f"{path}: tensor {name!r} came out as {tuple(tensor.shape)} "
                                          f"{tensor.dtype}, not the announced {specs[name]}")
                if tensor.numel():
                    f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class LazyTensor:
    """A tensor produced only when written: its shape and dtype up front, the values from `make()`."""

    __slots__ = ("shape", "dtype", "make")

    def __init__(self, shape, dtype: torch.dtype, make):
        self.shape, self.dtype, self.make = tuple(shape), dtype, make

    def tensor(self) -> torch.Tensor:
        return self.make()


def _spec_of(name: str, value) -> tuple[tuple[int, ...], torch.dtype]:
    if isinstance(value, LazyTensor):
        return value.shape, value.dtype
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    raise TypeError(f"tensor {name!r}: expected a torch.Tensor or a LazyTensor, got {type(value).__name__}")
