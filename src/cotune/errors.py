"""The one marker of an ordinary error: a condition the user can fix, not a bug in cotune.

cotune's own error types for bad input, a missing asset, a busy or unusable run directory, a device
this machine lacks, ... derive from `OrdinaryError` besides their usual base (ValueError,
RuntimeError, FileNotFoundError), so code that catches those still does. The CLI's error boundary
(`cli/errors.ordinary_text`) prints any `OrdinaryError` as one `error:` paragraph, its message as it
is, exit code 2: a new ordinary error type is named here by its base, never in a list in the CLI.
Its message must name the problem and what to do, and never quote user data.
"""

from __future__ import annotations

__all__ = ["OrdinaryError"]


class OrdinaryError(Exception):
    """A condition the user can fix; the message says what to do (the CLI prints it, exit code 2)."""
