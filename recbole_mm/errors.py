"""Errors that mean "the user's input is wrong" (a setting, a file, a path), not "the code is wrong".

The command-line entry points print a :class:`UserError` as one line ``error: <message>`` and exit
with code 2; every other exception keeps its traceback, so that bugs are not hidden behind a
one-line message. The message names the setting or file, the value and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input: printed by the CLIs as one line (exit code 2), never as a traceback."""


class ConfigError(UserError, ValueError):
    """A setting (command line, ``config_dict``, config file, tuning params file) has a bad value."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable, unsafe or made for another model/dataset."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's atomic files are not where the settings point; the message says how to make them."""
