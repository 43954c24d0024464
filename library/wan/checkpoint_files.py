"""Reading checkpoint files tensor by tensor: safetensors (single or sharded) and torch `.pth`.

Everything here is about bytes on disk, not about WAN: open a path, list its tensors with shapes and
dtypes from the headers alone, and read one tensor at a time. Safetensors are memory-mapped privately
(copy-on-write) and tensors are zero-copy views of the mapping: a model loaded in the file's dtype costs
the file's pages once (page cache, reclaimable), never a second anonymous copy. A tensor converted to
another dtype or device is `release`d so its mapped pages do not stay resident beside the copy.
`.pth` files go through `torch.load(weights_only=True, mmap=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what was asked; the message says what to do."""


class SafetensorsFile:
    """One .safetensors file: header parsed and checked against the file size, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: file is {size} bytes, too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{self.path}: not a safetensors file, or truncated (header length {header_len} for a "
                    f"{size}-byte file); re-download or re-export it"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{self.path}: unreadable safetensors header ({exc}); the file is damaged") from None
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._entries: dict = header
        self._data_start = 8 + header_len
        self._map: mmap.mmap | None = None
        need = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._data_start + need > size:
            raise CheckpointError(
                f"{self.path}: truncated: the header promises {self._data_start + need} bytes but the file "
                f"has {size}; the download or copy did not finish, fetch the file again"
            )
        for name, entry in header.items():
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")

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

    def release(self, key: str) -> None:
        """Drop the mapped pages of a tensor that has been copied elsewhere (keeps peak RSS at one copy)."""
        if self._map is None:
            return
        start, end = (self._data_start + o for o in self._entries[key]["data_offsets"])
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


class PickleCheckpoint:
    """A torch `.pth`/`.pt`/`.bin` state dict, loaded memory-mapped with `weights_only=True`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # legacy (non-zip) pickles cannot be memory-mapped; still weights_only
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise CheckpointError(
                f"{self.path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: {exc}); "
                "it may be truncated, or contain code objects we refuse to unpickle"
            ) from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{self.path}: does not hold a flat state dict of tensors")
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
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
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
        raise CheckpointError(f"{index}: {len(lost)} tensors named in the index are absent from the shards, e.g. {lost[:3]}")
    return ckpt


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a file, or a folder holding one checkpoint file or a shard index (`*.index.json`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
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
                if tuple(tensor.shape) != tuple(specs[name]["shape"]) or _DTYPE_NAMES[tensor.dtype] != specs[name]["dtype"]:
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
