"""The data layer's one error type, in its own module so every data module can raise it."""

from __future__ import annotations

from cotune.errors import OrdinaryError


class DataError(ValueError, OrdinaryError):
    """Data that cannot make the requested federation (missing, empty, too short, wrong columns)."""
