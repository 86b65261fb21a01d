"""The errors :func:`~captum_effattn.explain_dataset` raises before any work starts.

Every one is a :class:`DatasetInputError` (a ``ValueError``), so a caller can catch them all; the
command line prints the message and exits with status 2.
"""

from __future__ import annotations


class DatasetInputError(ValueError):
    """Bad input to :func:`~captum_effattn.explain_dataset`, found before any row is explained."""


class InputFileError(DatasetInputError):
    """The input file does not exist, cannot be read, or has an unsupported extension."""


class MissingColumnError(DatasetInputError):
    """A column named by ``text_column``/``id_column``/``label_column`` is not in the input."""


class OutputPathError(DatasetInputError):
    """The output path cannot be written: its directory is missing, or it names a directory."""


class ResumeMismatchError(DatasetInputError):
    """``resume=True`` on an output written by another model, other methods or other settings."""


class UnknownMethodError(DatasetInputError):
    """A method name that is not a known view (optionally ``+weighting``)."""


class RayAddressError(DatasetInputError):
    """``ray_address`` names no Ray cluster that answers."""


class EngineUnavailableError(DatasetInputError):
    """An unknown engine, or the Ray engine without Ray installed."""


class ModelLoadError(DatasetInputError):
    """The model directory holds no sequence classifier with its tokenizer, or ``max_length``
    does not fit the model."""
