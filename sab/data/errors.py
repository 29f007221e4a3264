"""Errors of the data layer (SPEC §10).

Every error names the file it is about. A missing file says where to put it and where it comes
from; a bad file says what was expected and what was found. The data layer never deletes, moves
or rewrites a file it did not create itself: a bad file stays where it is, for the user to look at.
"""
from __future__ import annotations


class DataError(Exception):
    """Base class of every error raised by `sab.data`."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the registry names is not in the data root.

    The message names the file, the exact path where it belongs, its canonical URL and, where the
    file can be built from something installed, the `sab data prepare NAME` command.
    """


class BadFileError(DataError, ValueError):
    """A file is present but unusable: wrong size or checksum, truncated, corrupted, wrong magic
    number, empty. The file is left untouched."""


class ChecksumError(BadFileError):
    """A file's size or checksum differs from the recorded one (both are in the message)."""

    def __init__(self, message: str, *, path: str = "", expected: str = "", found: str = ""):
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.found = found


class DownloadError(DataError, OSError):
    """A download did not complete. Whatever arrived stays in a `.part` file, which `check` and
    the loaders never read; the next `fetch` resumes it when the server allows."""
