"""Errors meant for people.

Every error raised on bad input is a ``CxrError`` whose message is one plain sentence that says
what was received and what to do. The command line turns it into exit code 2 without a traceback;
the pages show it with ``st.error``. Anything else is a bug (exit code 1).
"""
from __future__ import annotations


class CxrError(Exception):
    """A problem with the user's input; ``str(error)`` is one sentence for a person."""


class BadSettingError(CxrError, ValueError):
    """A setting a person chose that cannot work (an unknown backbone, an image too small for it).

    Also a ``ValueError``, so code that validates values generically still catches it.
    """


class BadImageError(CxrError):
    """An image file that cannot be used (corrupt, not an image, too large, no pixel data)."""


class BadDatasetError(CxrError):
    """A data set folder or archive that cannot be used (missing, empty, one class, unsafe zip)."""


class BadRunError(CxrError):
    """A run folder that cannot be loaded (missing files, not a model, unknown version)."""


class TrainingBusyError(CxrError):
    """A training job is already running on this server."""


class JobQueueError(CxrError):
    """A training job the queue refuses (the owner's limit) or cannot change now."""


class ServerBusyError(CxrError):
    """The server is already doing this one-at-a-time work (unpacking an archive); try again later."""


class DownloadError(CxrError):
    """A download that failed or whose checksum does not match."""


class DiskFullError(CxrError):
    """The disk filled up while a run was being written; earlier runs are untouched."""


def lower_first(text: str) -> str:
    """``text`` with its first letter in lower case, to continue a sentence with another error's sentence."""
    return text[:1].lower() + text[1:] if text else text
