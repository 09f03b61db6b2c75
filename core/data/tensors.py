"""Tensor samples: shards whose samples carry precomputed tensors instead of an image.

Format (documented in ``core/data/README.md``): a tensor sample is an ordinary webdataset sample
whose member ``KEY.tensors.safetensors`` holds all its tensors (names, dtypes and shapes are in the
safetensors header; no batch dimension), next to the usual ``KEY.txt`` caption and an optional
``KEY.json``. One safetensors member per sample rather than one member per tensor: the shapes of
all tensors can then be read from a single small header, without decoding, to choose the batch.

The data layer does not know what the tensors mean; it only batches samples whose tensors have
the same names, dtypes and shapes (their *signature*) and stacks them.
"""
from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

#: Extension (webdataset naming: after the key's first dot) of a sample's tensors member.
TENSORS_EXT = "tensors.safetensors"

#: Batch fields the pipeline fills itself; a tensor may not take one of these names.
RESERVED_NAMES = frozenset({"captions", "keys", "urls", "json", "epoch", "sample_epochs"})

#: A signature: ((name, dtype, shape), ...) sorted by name. Hashable and sortable.
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]

_HEADER_LIMIT = 100 << 20   # a header larger than this is a damaged length field, not a header


class BadTensors(Exception):
    """The tensors member cannot be parsed."""


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a ``KEY.tensors.safetensors`` member (CPU, contiguous copies of ``tensors``)."""
    from safetensors.torch import save

    bad = sorted(RESERVED_NAMES & set(tensors))
    if bad:
        raise ValueError(f"tensor names {bad} are reserved for batch fields")
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=metadata)


def probe_signature(data: bytes) -> Signature:
    """Names, dtypes and shapes of a safetensors blob, from its header only (no tensor decoded)."""
    if len(data) < 8:
        raise BadTensors(f"{len(data)} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, _HEADER_LIMIT):
        raise BadTensors(f"header length {n} exceeds the member ({len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadTensors(f"unparseable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise BadTensors("safetensors header is not a JSON object")
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
        except (TypeError, KeyError, ValueError):
            raise BadTensors(f"tensor {name!r}: no dtype/shape in the header") from None
        if name in RESERVED_NAMES:
            raise BadTensors(f"tensor name {name!r} is reserved for a batch field")
        out.append((name, dtype, shape))
    if not out:
        raise BadTensors("no tensors in the member")
    return tuple(sorted(out))


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors blob (BadTensors if it cannot be decoded)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise BadTensors(f"{type(e).__name__}: {e}") from None


def signature_label(sig: Signature) -> str:
    """Short text of a signature for the per-bucket counters, e.g. ``a=16x4x4,b=77x32``."""
    return ",".join(f"{name}={'x'.join(map(str, shape)) or 'scalar'}" for name, _dtype, shape in sig)


__all__ = ["TENSORS_EXT", "RESERVED_NAMES", "BadTensors", "Signature", "decode_tensors", "encode_tensors",
           "probe_signature", "signature_label"]
