"""Arrays as bytes: how latents and embeddings travel in shards and manifests (never pickled)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np


def to_npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# .npy preamble (magic, version, header) -> (dtype, shape, Fortran order): training reads millions of
# arrays of a handful of shapes, and numpy's header parser (ast.literal_eval) would dominate.
_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def from_npy_bytes(data: bytes) -> np.ndarray:
    """One .npy array; anything else (a pickle, an .npz or torch.save zip) raises ValueError.

    A header seen before is not parsed again; the first of each kind goes through `np.load`."""
    preamble = _npy_preamble(data)
    known = _NPY_HEADERS.get(preamble) if preamble else None
    if known is not None:
        dtype, shape, fortran = known
        count = math.prod(shape)
        if len(data) < len(preamble) + count * dtype.itemsize:
            raise ValueError("the .npy data ends early")
        array = np.frombuffer(data, dtype, count, len(preamble))
        return array.reshape(shape, order="F" if fortran else "C").copy()
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(array, np.ndarray):  # np.load opens any zip as an NpzFile
        array.close()
        raise ValueError("not a .npy array (a zip archive)")  # noqa: TRY004 - readers count a bad member on ValueError
    if preamble and not array.dtype.hasobject and len(_NPY_HEADERS) < 1024:
        _NPY_HEADERS[preamble] = (array.dtype, array.shape, bool(np.isfortran(array) and array.ndim > 1))
    return array


def _npy_preamble(data: bytes) -> bytes | None:
    """The magic, version and header of a .npy file (the bytes before its data), or None."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        return None
    size = int.from_bytes(data[8:10], "little") + 10 if data[6] == 1 else int.from_bytes(data[8:12], "little") + 12
    return data[:size] if len(data) >= size else None


def to_base64_npy(array: np.ndarray) -> dict:
    """A JSON-friendly record of an array: dtype, shape and the .npy bytes in base64."""
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "npy_base64": base64.b64encode(to_npy_bytes(array)).decode("ascii"),
    }


def from_base64_npy(record: dict) -> np.ndarray:
    return from_npy_bytes(base64.b64decode(record["npy_base64"]))
