"""The one error type users see: a one-line message, exit code 1, no traceback."""


class BincountError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits 1."""
