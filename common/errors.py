"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input or setup: the message names the file, the problem
    and the fix. Never raised for bugs in this project."""


def config_error(e: Exception, source: str) -> UserError:
    """A YAML/OmegaConf failure as one line naming `source` and, when OmegaConf knows it, the
    key (`config x.yaml (key train.lr): ...`); raise it `from None` to drop the traceback."""
    key = getattr(e, "full_key", None)
    where = f" (key {key})" if key else ""
    return UserError(f"{source}{where}: {str(e).splitlines()[0]}")
