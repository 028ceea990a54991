"""One exception hierarchy, so callers can catch ``DFloatError`` and users get messages that name the problem."""

from __future__ import annotations


class DFloatError(Exception):
    """Base class of every error dfloat raises on purpose."""


class UnsupportedDtypeError(DFloatError, TypeError):
    """A tensor is not BF16 where BF16 is required (coding anything else as BF16 would not be lossless)."""


class FormatVersionError(DFloatError):
    """A file was written by a newer, incompatible format version, or is not a dfloat file at all."""


class CorruptStreamError(DFloatError):
    """A coded stream or its metadata is inconsistent (truncated, bit-flipped, out-of-range offsets)."""


class ChecksumError(CorruptStreamError):
    """Decoded bytes do not match the checksum stored for the original tensor."""


class ShapeMismatchError(DFloatError):
    """Member shapes or sizes disagree with the stored data or with what the caller expects."""


class BackendUnavailableError(DFloatError, RuntimeError):
    """A decoder backend was asked for by name but cannot run here; the message says what to install."""


class ModelSourceError(DFloatError):
    """A model source (Hub id, folder, in-memory model) cannot be read or is not a model."""


class OutputExistsError(DFloatError, FileExistsError):
    """An output folder exists and the caller did not ask to overwrite it."""


class OutputWriteError(DFloatError, OSError):
    """An output file could not be written (disk full, no permission); nothing half-written is left behind."""


class GenerationError(DFloatError, ValueError):
    """Generation was asked for with inputs or options it cannot honour (right-padded prompts, no CUDA for graphs)."""
