"""User-facing errors: one line saying what is wrong, where, and how to fix it."""


class MarbleError(Exception):
    """A mistake in user input or environment (bad flag, missing weights, corrupt checkpoint).

    The CLI prints ``str(error)`` on one line and exits with code 2; no traceback.
    """
