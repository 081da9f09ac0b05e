"""Arrays as bytes: how latents and embeddings travel in shards and manifests (never pickled)."""

from __future__ import annotations

import base64
import io

import numpy as np


def to_npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def from_npy_bytes(data: bytes) -> np.ndarray:
    """One .npy array; anything else (a pickle, an .npz or torch.save zip) raises ValueError."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray):  # np.load opens any zip as an NpzFile
        array.close()
        raise ValueError("not a .npy array (a zip archive)")  # noqa: TRY004 - readers count a bad member on ValueError
    return array


def to_base64_npy(array: np.ndarray) -> dict:
    """A JSON-friendly record of an array: dtype, shape and the .npy bytes in base64."""
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "npy_base64": base64.b64encode(to_npy_bytes(array)).decode("ascii"),
    }


def from_base64_npy(record: dict) -> np.ndarray:
    return from_npy_bytes(base64.b64decode(record["npy_base64"]))
