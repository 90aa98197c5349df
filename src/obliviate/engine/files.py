"""Atomic, durable file writes: write to a temporary name, fsync, rename into place."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..tensors import SAFETENSORS_DTYPES, tensor_spec

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# files list tensors by dtype (in the order of safetensors' Dtype enum, last first), then by name
_DTYPE_RANK = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """The bytes ``safetensors.torch.save_file`` writes (same header, order and padding), but
    streamed tensor by tensor: ``save_file`` first copies every tensor into one buffer, a whole
    extra model in memory at Stable Diffusion's size. ``tensors`` may be lazy (``LazyTensors``):
    each is then read once, while it is written."""
    specs = {name: tensor_spec(tensors, name) for name in tensors}
    unknown = [n for n, (dtype, _) in specs.items() if dtype not in SAFETENSORS_DTYPES]
    if unknown:
        raise ValueError(f"Tensor {unknown[0]!r} has dtype {specs[unknown[0]][0]}, which the store does not write.")
    order = sorted(specs, key=lambda name: (-_DTYPE_RANK[specs[name][0]], name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            if (t.dtype, tuple(t.shape)) != specs[name]:
                raise ValueError(f"Tensor {name!r} changed while it was written ({specs[name]} became {(t.dtype, tuple(t.shape))}).")
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)  # a view of the tensor, not a copy
        f.flush()
        os.fsync(f.fileno())


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write_safetensors(tensors, tmp, metadata)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)
