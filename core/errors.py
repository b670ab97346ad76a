"""penult's exceptions: :class:`PenultError`, the base of every error penult raises on purpose
(the CLI prints its message on one line and exits 2; anything else is a bug and shows its
traceback), and the store's own (one module, so segments and the store raise the same types)."""

from __future__ import annotations

__all__ = [
    "FingerprintMismatchError",
    "OptionError",
    "PenultError",
    "StoreError",
    "StoreLockedError",
]


class PenultError(Exception):
    """An error penult raises on purpose: bad input, a bad option, a store or model that does
    not fit. Its message names the file and the problem."""


class OptionError(PenultError, ValueError):
    """An option value out of range or unknown (a device, a precision, a fraction...)."""


class StoreError(PenultError):
    """The store is missing, not a penult store, or inconsistent."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class FingerprintMismatchError(StoreError):
    """The store holds a backbone of this name made with other weights or preprocessing."""
