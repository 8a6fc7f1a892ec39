"""Content digests that detect a file changed after tl_steer wrote it (a flipped byte, a bad copy).

blake2b (32 bytes) over the bytes: :func:`file_digest` for a whole file, read in chunks;
:func:`tensors_digest` over a dict of tensors (names, dtypes, shapes and data, in name order), so the
digest of a saved intervention does not depend on how safetensors lays the file out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

DIGEST = "blake2b-256"


def file_digest(path: str | Path, *, chunk: int = 1 << 22) -> str:
    """The blake2b digest (hex, 32 bytes) of a file's bytes, read ``chunk`` bytes at a time."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """The blake2b digest (hex) of tensors: each one's name, dtype, shape and raw bytes, by sorted name."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
