"""The one exception type users see: a mistake in their input or setup, told in one line."""


class Rank1Error(Exception):
    """A user-facing error: the CLI prints its message (no traceback) and exits with status 2."""
