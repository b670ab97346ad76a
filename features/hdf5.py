"""What both store formats read the same way: the root's mark, attributes, string columns and
a backbone group's attributes."""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

FORMAT = "penult-feature-store"


def attributes(obj: h5py.HLObject) -> dict[str, Any]:
    """An HDF5 object's attributes as plain Python values."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in obj.attrs.items()}


def decode(values: np.ndarray) -> list[str]:
    """Stored strings back to str; bytes that are not UTF-8 come back surrogate-escaped (lossless)."""
    return [
        v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values
    ]


def backbone_attr_problems(g: h5py.Group) -> list[str]:
    """Fingerprint, dim and dtype attributes of a backbone group (both formats)."""
    try:
        fp = json.loads(g.attrs["fingerprint"])
        if not isinstance(fp, dict):
            raise ValueError("not a JSON object")
        dim = int(g.attrs["dim"])
        np.dtype(str(g.attrs["dtype"]))
    except KeyError as e:
        return [f"attribute {e} is missing"]
    except (TypeError, ValueError) as e:
        return [f"fingerprint/dim/dtype attributes are malformed ({e})"]
    if "dim" in fp and fp["dim"] != dim:
        return [f"fingerprint dim {fp['dim']} but dim attribute {dim}"]
    return []
