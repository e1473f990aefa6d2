"""The one exception type for user errors (bad files, flags, checkpoints)."""


class FmnistError(Exception):
    """A user-facing error: its message names what was wrong and what to do.

    Scripts print the message on one line and exit with status 1.
    """
