"""penult: extract penultimate-layer CNN embeddings once, train heads on them in seconds.

The Python API (see :mod:`penult.api`): ``open_store``, ``train``, ``predict``, ``count``,
``load_model``. The folders ``core/``, ``features/``, ``extract/`` and ``classify/`` install as
``penult.core``, ``penult.features``, ``penult.extract`` and ``penult.classify``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Store", "count", "load_model", "open_store", "predict", "train"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import penult.features` (every command) stays as light as it was
    if name in __all__:
        from penult import api

        return getattr(api, name)
    raise AttributeError(f"module 'penult' has no attribute {name!r}")
