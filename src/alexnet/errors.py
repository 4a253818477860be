"""The one exception type for mistakes a user can fix (bad paths, bad config, bad files).

The command line prints these as a single line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class AlexNetError(Exception):
    """A user-facing error: its message says what was expected and what was found."""


class Stopped(Exception):
    """Training stopped on request (SIGTERM, SIGINT) after saving a checkpoint it can resume from.

    ``exit_code`` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the status
    a shell reports for a process ended by that signal, so batch scripts and schedulers
    see "stopped, not finished", while the message says where the checkpoint is.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
