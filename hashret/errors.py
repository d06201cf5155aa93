"""One error family for every stage.

Each error kind carries the process exit code the CLI returns and the gRPC status
name the server maps it to, so callers never translate by hand. Messages follow
"<thing> | <problem>: <fix>".
"""
from __future__ import annotations


class HashretError(Exception):
    """Base of all errors a user can act on."""

    exit_code = 2
    grpc_code = "INTERNAL"


class BadInput(HashretError):
    """Input data (an image, a label file, a request field) is malformed."""

    exit_code = 2
    grpc_code = "INVALID_ARGUMENT"


class MissingArtifact(HashretError):
    """A file or folder that a stage needs does not exist."""

    exit_code = 2
    grpc_code = "NOT_FOUND"


class ArtifactMismatch(HashretError):
    """An artifact exists but does not match what it should (sha256, bits, schema, version)."""

    exit_code = 2
    grpc_code = "FAILED_PRECONDITION"


class NotFound(HashretError):
    """A requested id or item is not in the gallery."""

    exit_code = 2
    grpc_code = "NOT_FOUND"


class Unavailable(HashretError):
    """An optional dependency, device or service is not available here."""

    exit_code = 2
    grpc_code = "UNAVAILABLE"


class ReadOnly(HashretError):
    """A write reached something opened read-only (a gallery served by several processes)."""

    exit_code = 2
    grpc_code = "FAILED_PRECONDITION"


class Overloaded(HashretError):
    """A queue is full; the caller should back off and retry."""

    exit_code = 2
    grpc_code = "RESOURCE_EXHAUSTED"


class CheckFailed(HashretError):
    """A quality or parity threshold was exceeded."""

    exit_code = 1
    grpc_code = "FAILED_PRECONDITION"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (or its type's name), for a log line or a reply:
    library errors (CUDA, ONNX Runtime) can run to pages."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
