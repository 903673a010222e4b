"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input or setup: the message names the file, the problem
    and the fix. Never raised for bugs in this project."""
