"""Explaining datasets: a CSV, JSON-lines or Parquet file of texts into one Parquet file of token
scores, on this machine or on Ray Data (``python -m captum_effattn explain``).

Public names: :func:`explain_dataset`, :func:`load_attributions` (both also in the top-level
namespace), :class:`ExplainSummary`, :class:`ExplainedText` and the errors of
:mod:`captum_effattn.dataset.errors`. The output schema is documented in
:mod:`captum_effattn.dataset.schema`.
"""

from captum_effattn.dataset.errors import (
    DatasetInputError,
    EngineUnavailableError,
    InputFileError,
    MissingColumnError,
    ModelLoadError,
    OutputPathError,
    RayAddressError,
    ResumeMismatchError,
    UnknownMethodError,
)
from captum_effattn.dataset.explain import ExplainSummary, explain_dataset
from captum_effattn.dataset.methods import available_methods
from captum_effattn.dataset.results import ExplainedText, load_attributions

__all__ = [
    "DatasetInputError",
    "EngineUnavailableError",
    "ExplainSummary",
    "ExplainedText",
    "InputFileError",
    "MissingColumnError",
    "ModelLoadError",
    "OutputPathError",
    "RayAddressError",
    "ResumeMismatchError",
    "UnknownMethodError",
    "available_methods",
    "explain_dataset",
    "load_attributions",
]
