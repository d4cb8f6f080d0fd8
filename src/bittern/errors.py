"""Exceptions shared across bittern's layers."""


class UsageError(Exception):
    """A problem with the user's input (a bad argument, a missing file), reported without a traceback."""
