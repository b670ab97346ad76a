"""Heads on cached features (see issue 3); nothing public yet."""

__all__: list[str] = []
