"""Errors that carry a reason code and a sentence a person can act on.

Every error the agent reports about a task is a ``CioError``: ``code`` is a short stable
identifier (for queues, logs and tests), ``str(err)`` is the sentence for a person.
"""

from __future__ import annotations


class CioError(Exception):
    """Base of every error cio_worker raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class FrameSpecError(CioError, ValueError):
    """A frame spec (Conductor or cnode form) that does not follow the grammar."""

    code = "bad_frames"


class TokenError(CioError, ValueError):
    """An unknown token, or a malformed template."""

    code = "bad_template"


class DocumentError(CioError, ValueError):
    """A task document or job spec field that is missing or wrong; names the field."""

    code = "bad_document"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PathError(CioError, ValueError):
    """An artist path that cannot be placed on the node (relative, climbing with '..')."""

    code = "bad_path"


class EnvironmentSpecError(CioError, ValueError):
    """An environment entry that cannot be applied."""

    code = "bad_environment"


class StorageError(CioError):
    """A storage request that failed for a reason a retry will not fix (denied, missing)."""

    code = "storage"


class ChecksumError(StorageError):
    """Content whose MD5 does not match the manifest, even after one re-fetch."""

    code = "checksum_mismatch"


class QueueError(CioError):
    """The queue cannot be opened or answered in a way the agent cannot use."""

    code = "queue"


class LeaseLost(QueueError):
    """The agent's lease on a task is gone (expired and taken, or cancelled)."""

    code = "lease_lost"


class RenderError(CioError):
    """The render command failed, or did not write what it was meant to write."""

    code = "render_failed"
