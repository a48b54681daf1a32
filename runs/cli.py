"""How the entry points end on a user's mistake: one line naming what to fix, exit status 2.

A mistake in a config key or value, a path, a data layout or a refused resume raises one of
:data:`USER_ERRORS` (the project's own errors subclass them) with a message that names the key, value or
path, or ``SystemExit("message")`` in the scripts' own argument checks. The entry points print that message alone (``error: ...`` on stderr) and exit with status 2, as
Hydra, pip and git do; ``HYDRA_FULL_ERROR=1`` or ``LVLM_DEBUG=1`` shows the traceback instead. Any other
exception is a bug and keeps its traceback (exit status 1).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

#: The errors a user's mistake raises (config values, paths, data layouts, refused resumes).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)
DEBUG_VARIABLES = ("HYDRA_FULL_ERROR", "LVLM_DEBUG")

F = TypeVar("F", bound=Callable[..., Any])


def debugging() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1`` or ``LVLM_DEBUG=1``)."""
    return any(os.environ.get(name) == "1" for name in DEBUG_VARIABLES)


def message_of(err: BaseException) -> str:
    """The error's own message (a KeyError's without the quotes ``str`` adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    return str(err)


def user_errors_in_one_line(fn: F) -> F:
    """Wrap an entry point: a user error ends in ``error: <message>`` and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit as err:  # ``raise SystemExit("message")``: a user error said in one line already
            if isinstance(err.code, str):
                print(f"error: {err.code}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise
        except USER_ERRORS as err:
            if debugging():
                raise
            print(f"error: {message_of(err)}  (HYDRA_FULL_ERROR=1 shows the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
