"""Exceptions raised by library code. Each message names what is wrong and how to fix it;
only ``dad.cli`` turns them into exit codes."""

from __future__ import annotations


class DadError(Exception):
    """A user-facing error: one line naming the file or flag at fault and the fix."""


class CheckpointError(DadError):
    """A checkpoint cannot be read or does not match the requested architecture."""


class ConfigError(DadError):
    """A configuration value is invalid; the message names the flag to change."""


class CacheError(DadError):
    """A teacher cache is missing, incomplete, corrupt or incompatible."""


class DataError(DadError):
    """An input image or dataset file is missing or malformed."""


class StorageError(DadError):
    """Reading an input failed in a way that says nothing about the input (an I/O error, a
    stale network file handle, too many open files): the job stops rather than record the input
    as bad, and a re-run resumes once the storage is healthy."""
