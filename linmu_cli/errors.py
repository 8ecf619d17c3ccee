"""The one exception type for bad user input: the CLI prints its message on one line and exits with 2."""


class LinmuError(Exception):
    """A problem with what the user asked for (bad path, bad value, missing checkpoint), not a bug."""
