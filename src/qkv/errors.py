"""The one user-facing exception type: every message names the problem and the fix."""

import os


class QkvError(Exception):
    """A user error (bad input, config or file); the CLI prints it as one line and exits 2."""


class ConfigError(QkvError, ValueError):
    """An invalid model configuration; the message names the field and the fix."""


def describe_os_error(err: OSError) -> str:
    """An OSError as its errno's meaning and number: "No space left on device (errno 28)"."""
    if err.errno is None:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{err.strerror or os.strerror(err.errno)} (errno {err.errno})"
