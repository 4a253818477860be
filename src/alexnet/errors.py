"""The one exception type for mistakes a user can fix (bad paths, bad config, bad files).

The command line prints these as a single line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class AlexNetError(Exception):
    """A user-facing error: its message says what was expected and what was found."""
