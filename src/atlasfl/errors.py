"""User-facing errors: one line that names the problem and the fix, never a traceback."""


class AtlasError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""

    exit_code = 2


class RunInterrupted(Exception):
    """SIGINT or SIGTERM arrived: the run stops at once; its last complete checkpoint stays."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum
