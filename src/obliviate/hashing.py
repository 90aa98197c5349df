"""Content hashes of tensors and files, the basis of tamper detection."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: independent of file format."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_hashes(folder: str | Path, hash_file=file_hash) -> dict[str, str]:
    """``hash_file`` (sha256 by default) of every file under ``folder``, keyed by its path
    relative to it (``unet/config.json``)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hash_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
