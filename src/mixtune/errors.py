"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MixtuneError(Exception):
    """A problem the user can fix: bad input, bad params, a missing file. Message is one line."""
