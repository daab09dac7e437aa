"""Errors a user causes (a file, column, shape or value that is wrong), told apart from bugs.

The CLI turns these (and ``OSError``, ``ImportError``) into a one-line message and a non-zero
exit; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Something the user gave is wrong; the message names the file, column, shape or value."""


class MissingKeyError(InputError, KeyError):
    """A column, layer or label the input does not have; the message lists the ones it has."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class DivergedError(InputError):
    """Training produced non-finite losses or gradients (a learning rate too high, or the data);
    the message names the steps and the checkpoint that was kept."""
