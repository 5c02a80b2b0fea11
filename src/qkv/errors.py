"""The one user-facing exception type: every message names the problem and the fix."""


class QkvError(Exception):
    """A user error (bad input, config or file); the CLI prints it as one line and exits 2."""


class ConfigError(QkvError, ValueError):
    """An invalid model configuration; the message names the field and the fix."""
