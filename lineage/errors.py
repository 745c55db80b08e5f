"""Typed errors raised by the library.

Every error carries a one-line message that names the offending file (or model
reference) and says what was expected and what was found.  The CLI maps any
:class:`LineageError` to exit code 2 and prints only the message.
"""

from __future__ import annotations


class LineageError(Exception):
    """Base class of every error the library raises on bad input."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CheckpointError(LineageError):
    """A checkpoint (file, folder, shard set) cannot be used."""


class HeaderError(CheckpointError):
    """A safetensors (or other) header is malformed or hostile."""


class ShardError(CheckpointError):
    """A sharded checkpoint's index is inconsistent with the files present."""


class UnsupportedFormatError(CheckpointError):
    """The file format or a tensor dtype is not supported."""


class ShapeMismatchError(LineageError):
    """Two tensors that should correspond have incompatible shapes."""


class ArchitectureError(LineageError):
    """The two models cannot be related: nothing could be paired."""


class RemoteError(LineageError):
    """A remote (HTTP / Hub) read failed after retries, or was refused."""


class FingerprintError(LineageError):
    """A fingerprint file is malformed or of an unsupported version."""


class ConfigError(LineageError):
    """Invalid options passed to the library."""
