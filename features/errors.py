"""The store's exceptions (one module, so segments and the store raise the same types)."""

from __future__ import annotations


class StoreError(Exception):
    """The store is missing, not a penult store, or inconsistent."""


class StoreLockedError(StoreError):
    """Another process is writing the store."""


class FingerprintMismatchError(StoreError):
    """The store holds a backbone of this name made with other weights or preprocessing."""
