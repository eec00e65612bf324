"""The exception type that reaches the user as a single line, never a traceback."""


class TinytError(Exception):
    """A problem the user can fix: bad config, missing file, unusable checkpoint, bad input.

    The message is complete on its own: it names what is wrong and how to fix it. The CLI prints
    it as one line on stderr and exits with code 2.
    """


class MainProcessFailed(TinytError):
    """Raised on torchrun ranks > 0 when rank 0 failed in work it did for everyone; rank 0
    reports the reason itself, so the others exit without repeating it."""
