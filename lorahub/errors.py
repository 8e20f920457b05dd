"""Errors lorahub reports to users: one line, naming the file and the tensor or key."""
from __future__ import annotations


class LorahubError(Exception):
    """A problem with the user's input or environment; the CLI prints it on one line and exits with
    `exit_code` (1; `OptionError`: 2)."""

    exit_code = 1

    def __init__(self, message: str, *, path: object | None = None, key: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if key is not None:
            parts.append(f"tensor '{key}'" if not key.startswith("'") else key)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.key = key


class OptionError(LorahubError):
    """An option value or a combination of options the operation cannot take (`--rank 0`, a weight per
    adapter missing, `--param` without `--rank-method`): the CLI's usage error, exit status 2."""

    exit_code = 2


class UnsupportedError(LorahubError):
    """The input is recognised but the operation does not support it (LyCORIS math, DoRA blends...)."""


class CheckFailed(LorahubError):
    """A check (validate, push refusal) found problems; carries a structured report."""

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report
