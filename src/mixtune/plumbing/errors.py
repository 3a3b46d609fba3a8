"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class MixtuneError(Exception):
    """A problem the user can fix: bad input, bad params, a missing file. Message is one line."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its type's name when it has no message)."""
    return (str(e).splitlines() or [type(e).__name__])[0]
