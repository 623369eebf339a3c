"""One rule for errors a user sees: a single `error: ...` line and a non-zero exit; the traceback only with
`lmconvert --debug`, which sets LMCONVERT_DEBUG=1 so that processes and threads started later (tensor-parallel
ranks, the server's engine thread) follow the same rule."""

import os

DEBUG_ENV = "LMCONVERT_DEBUG"


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits non-zero."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def first_line(e: BaseException) -> str:
    """The first line of e's message (third-party errors wrapped into a UserError may span several)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def one_line(e: BaseException) -> str:
    """The line a user sees for e: a UserError or OS error as it is, anything else with its type (an
    internal error) and a hint where the traceback is."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (UserError, OSError)):
        return first or type(e).__name__
    return f"{type(e).__name__}: {first} (lmconvert --debug ... shows the traceback)"
