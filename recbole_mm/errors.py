"""Errors that mean "the user's input is wrong" (a setting, a file, a path), not "the code is wrong".

The command-line entry points print a :class:`UserError` as one line ``error: <message>`` and exit
with code 2; every other exception keeps its traceback, so that bugs are not hidden behind a
one-line message. The message names the setting or file, the value and what to do.
"""

from __future__ import annotations

import os
from typing import Any


class UserError(Exception):
    """Bad user input: printed by the CLIs as one line (exit code 2), never as a traceback."""


class ConfigError(UserError, ValueError):
    """A setting (command line, ``config_dict``, config file, tuning params file) has a bad value."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable, unsafe or made for another model/dataset."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's atomic files are not where the settings point; the message says how to make them."""


class DataFormatError(UserError, ValueError):
    """Bad input data; the message names the file, row, field and value, and what to do."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, row: int | None = None,
                 field: str | None = None, value: Any = None, hint: str | None = None):
        self.file, self.row, self.field, self.value, self.hint = file, row, field, value, hint
        where = []
        if file is not None:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (", ".join(where) + ": " if where else "") + message
        if value is not None:
            text += f" (value: {show_value(value)})"
        if hint:
            text += f"; {hint}"
        super().__init__(text)


def show_value(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened to ``limit`` characters, for error messages."""
    try:
        r = repr(value)
    except ValueError:  # an int beyond Python's int-to-text digit limit
        r = f"<integer with about {value.bit_length() * 0.30103:.0f} digits>"
    return r if len(r) <= limit else r[: limit - 3] + "..."
