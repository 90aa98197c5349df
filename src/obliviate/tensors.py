"""Named tensors that are read one at a time.

A model's weights as a ``dict`` cost a full copy of the model in memory; at Stable Diffusion's
size the store cannot afford several (base, weights before a request, weights after it). A
``LazyTensors`` is a read-only mapping that produces each tensor when it is read and says its
dtype and shape without reading it, so weights can be hashed and written tensor by tensor.
"""

from __future__ import annotations

import json
import math
import struct
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator

import torch

# the dtype names in a safetensors header
SAFETENSORS_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64"}
_DTYPE_OF_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class LazyTensors(Mapping):
    """A read-only mapping of names to tensors, each produced when read (never kept)."""

    @abstractmethod
    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and shape of tensor ``name``, without reading it."""


def tensor_spec(tensors: Mapping, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """Dtype and shape of ``tensors[name]``; read from the header where ``tensors`` is lazy."""
    if isinstance(tensors, LazyTensors):
        return tensors.spec(name)
    return tensors[name].dtype, tuple(tensors[name].shape)


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Name -> (dtype, shape, offset of its bytes) from a safetensors file's header, checked so a
    damaged file is refused here (``ValueError``) rather than read wrong."""
    length = path.stat().st_size
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0] if length >= 8 else length
        if size > length - 8:
            raise ValueError(f"{path} is not a safetensors file (its header would end past the file).")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object).")
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = _DTYPE_OF_NAME[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: the header's entry for {name!r} is not one safetensors writes.") from None
        if start < 0 or any(n < 0 for n in shape) or end - start != math.prod(shape) * dtype.itemsize or 8 + size + end > length:
            raise ValueError(f"{path}: tensor {name!r}'s shape, dtype and byte range disagree; the file is damaged.")
        tensors[name] = (dtype, shape, 8 + size + start)
    return tensors


class StoredTensors(LazyTensors):
    """Tensors in safetensors files, read from disk on each access. ``files`` holds (key prefix,
    file) pairs: key ``prefix + name`` reads tensor ``name`` of that file.

    Each read is a plain ``readinto`` at the tensor's offset: no memory map, so a tensor costs
    its own bytes and nothing stays resident once it is dropped."""

    def __init__(self, files: Iterable[tuple[str, Path]]):
        self._where: dict[str, tuple[Path, int]] = {}  # key -> (file, offset of its bytes)
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for prefix, path in files:
            for name, (dtype, shape, offset) in _read_header(Path(path)).items():
                self._where[prefix + name] = (Path(path), offset)
                self._specs[prefix + name] = (dtype, shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        path, offset = self._where[key]
        dtype, shape = self._specs[key]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel():
            with open(path, "rb") as f:
                f.seek(offset)
                if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != tensor.numel() * tensor.element_size():
                    raise ValueError(f"{path} ends inside tensor {key!r}; the file is truncated.")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._specs[name]


class EditedTensors(LazyTensors):
    """``weights`` with ``deltas`` added and ``additions`` appended (``Edit.view``): a changed
    tensor is ``weights[name] + delta``, computed by the same operation each time it is read, so
    it is bit-identical to ``Edit.apply``'s."""

    def __init__(self, weights: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor],
                 additions: Mapping[str, torch.Tensor]):
        self.weights, self.deltas, self.additions = weights, deltas, additions

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.additions:
            return self.additions[name]
        weight = self.weights[name]
        delta = self.deltas.get(name)
        return weight if delta is None else weight + delta.to(weight)

    def __iter__(self) -> Iterator[str]:
        yield from self.weights
        yield from self.additions

    def __len__(self) -> int:
        return len(self.weights) + len(self.additions)

    def __contains__(self, name: object) -> bool:
        return name in self.additions or name in self.weights

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return tensor_spec(self.additions if name in self.additions else self.weights, name)
