"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class AtlasError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2
