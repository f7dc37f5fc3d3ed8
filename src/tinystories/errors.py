"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing file, a malformed option, an unreadable checkpoint."""
