"""Errors and warnings of the I/O layer.

Every bad-input error is a :class:`VolumeError` whose message is a single line
``"<path>: <problem>"`` so the CLI can print it as is, without a traceback.
"""
from __future__ import annotations

from os import PathLike


def one_line(text: object) -> str:
    """Collapse any whitespace run (newlines included) into one space."""
    return " ".join(str(text).split())


class VolumeError(ValueError):
    """Bad input: unreadable, missing, ambiguous or geometrically inconsistent image data.

    The message is always one line (newlines are collapsed) of the form ``"<path>: <problem>"``.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))

    @classmethod
    def at(cls, path: str | PathLike | None, problem: str) -> VolumeError:
        """``VolumeError.at(path, "problem")`` -> ``"<path>: problem"``."""
        return cls(f"{path if path is not None else 'input'}: {problem}")


class OutputExistsError(VolumeError, FileExistsError):
    """An output file exists and overwriting was not asked for (or the output is an input).

    Both a :class:`VolumeError` (so it is reported as a one-line user error) and a
    :class:`FileExistsError` (so ``except FileExistsError`` works too).
    """

    def __init__(self, message: object = "") -> None:
        VolumeError.__init__(self, message)

    def __str__(self) -> str:  # FileExistsError would otherwise format errno/filename
        return str(self.args[0]) if self.args else ""


class VolumeWarning(UserWarning):
    """The loader repaired or tolerated something in the input (e.g. dropped duplicate slices)."""
