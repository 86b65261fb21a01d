"""Explaining a batch of rows: the model, its tokenizer, and one attribution per method.

Both engines call :meth:`BatchExplainer.explain_table`; the Ray engine builds one
:class:`BatchExplainer` per actor from the picklable :class:`ExplainerSettings`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from captum_effattn.attr import WEIGHTINGS
from captum_effattn.dataset.errors import ModelLoadError
from captum_effattn.dataset.methods import Method
from captum_effattn.dataset.schema import (
    CONVERGENCE_DELTA,
    ERROR,
    ID,
    LABEL,
    PREDICTED_LABEL,
    PREDICTED_LABEL_NAME,
    PROBABILITY,
    ROW_INDEX,
    TEXT,
    TOKENS,
    InputColumns,
    OutputLayout,
)

DEFAULT_MODEL_PREFIX = "captum_effattn:"
FALLBACK_MAX_LENGTH = 512
"""The longest input when neither the config nor the tokenizer says."""
_GENERIC_LABEL = re.compile(r"LABEL_\d+")


@dataclass(frozen=True)
class ExplainerSettings:
    """Everything needed to build a :class:`BatchExplainer` (picklable, for Ray actors).

    Attributes:
        model_dir: a directory with a saved sequence classifier and its tokenizer.
        methods: one score column each.
        max_length: word pieces kept per text (longer texts are truncated).
        batch_size: texts per forward pass.
        columns: input column names.
        layout: output layout.
        device: torch device; ``None`` picks CUDA when available.
    """

    model_dir: str
    methods: tuple[Method, ...]
    max_length: int
    batch_size: int
    columns: InputColumns
    layout: OutputLayout
    device: str | None = None


def default_model(progress: bool, device: str | None = None):
    """``(directory, model, tokenizer)`` of the package's fine-tuned MiniLM, trained and cached on
    first use."""
    from captum_effattn.data import load_sentiment_classifier

    classifier = load_sentiment_classifier(progress=progress)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    directory = Path(classifier.metadata["directory"])
    return directory, classifier.model.eval().to(device), classifier.tokenizer


def model_identity(model_dir: Path, is_default: bool) -> dict[str, str]:
    """What names a model in an output's metadata: its directory (the cache entry's name for the
    default model, whose key hashes its training) and a hash of its ``config.json``."""
    config = model_dir / "config.json"
    name = DEFAULT_MODEL_PREFIX + model_dir.name if is_default else str(model_dir.resolve())
    return {"name": name, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()}


def load_model(model_dir: str | Path, device: str | None = None):
    """``(model, tokenizer)`` from a saved Hugging Face sequence classifier, offline, eval mode.

    Raises:
        ModelLoadError: the directory is missing or holds no classifier with a tokenizer.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model directory {model_dir} does not exist or has no config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"cannot load a sequence classifier with its tokenizer from {model_dir}: {exc}"
        ) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders (GPT-2, Llama) often ship none
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # to find each row's last real token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval().to(device), tokenizer


def resolve_max_length(requested: int | None, model, tokenizer) -> int:
    """``requested``, or the longest input the model takes when ``None``.

    Raises:
        ModelLoadError: ``requested`` is below 2 or beyond the model's position embeddings.
    """
    limits = [getattr(model.config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(value) for value in limits if value is not None and value < 1_000_000]
    limit = min(known, default=FALLBACK_MAX_LENGTH)
    if requested is None:
        return limit
    if not isinstance(requested, int) or not 2 <= requested <= limit:
        raise ModelLoadError(f"max_length must be an int in [2, {limit}]; got {requested!r}")
    return requested


def label_names(model) -> dict[int, str] | None:
    """The config's label names, or ``None`` when they are only ``LABEL_<i>``."""
    names = {int(key): str(value) for key, value in (model.config.id2label or {}).items()}
    if not names or all(_GENERIC_LABEL.fullmatch(name) for name in names.values()):
        return None
    return names


def decode_text(value: Any) -> tuple[str | None, str | None]:
    """``(text, None)`` for an explainable value, else ``(printable text or None, error)``."""
    if value is None:
        return None, "missing text (null)"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return value.decode("utf-8", errors="replace"), f"text is not valid UTF-8: {exc}"
    if not isinstance(value, str):
        return str(value), f"text is not a string (got {type(value).__name__})"
    if not value.strip():
        return value, "empty text"
    return value, None


class BatchExplainer:
    """Scores the tokens of texts with every method, and predicts their labels.

    Args:
        settings: see :class:`ExplainerSettings`.
        model, tokenizer: already loaded ones (default: load ``settings.model_dir``).
    """

    def __init__(self, settings: ExplainerSettings, model=None, tokenizer=None) -> None:
        from captum_effattn import EfficientAttentionAttribution

        if model is None:
            model, tokenizer = load_model(settings.model_dir, settings.device)
        self.settings = settings
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.names = label_names(model)
        self._logits: list[torch.Tensor] = []
        self.attribution = EfficientAttentionAttribution(self._forward, model=model)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        self._logits.append(logits.detach())
        return logits

    def explain_table(self, batch: pa.Table) -> pa.Table:
        """Explain an input batch (its columns plus :data:`ROW_INDEX`) into output rows (the
        layout's columns plus :data:`ROW_INDEX`), in the same order."""
        columns = self.settings.columns
        texts = batch.column(columns.text).to_pylist()
        row_index = batch.column(ROW_INDEX).to_pylist()
        ids = row_index if columns.id is None else batch.column(columns.id).to_pylist()
        results = self.explain_texts(texts)
        for result, row_id, index in zip(results, ids, row_index, strict=True):
            result[ID], result[ROW_INDEX] = row_id, index
        if columns.label is not None:
            for result, label in zip(results, batch.column(columns.label).to_pylist(), strict=True):
                result[LABEL] = label
        return pa.Table.from_pylist(results, schema=self.settings.layout.with_row_index())

    def explain_texts(self, values: Sequence[Any]) -> list[dict[str, Any]]:
        """One result per value: ``text``, ``tokens``, a column per method, the prediction,
        ``convergence_delta`` and ``error``. Values that are not explainable text, and texts whose
        explanation fails, get an ``error`` and null results; the others are explained in batches
        of ``settings.batch_size``."""
        results: list[dict[str, Any]] = []
        todo: list[int] = []
        for position, value in enumerate(values):
            text, error = decode_text(value)
            results.append({TEXT: text, ERROR: error})
            if error is None:
                todo.append(position)
        size = self.settings.batch_size
        for start in range(0, len(todo), size):
            positions = todo[start : start + size]
            self._explain_positions(results, positions)
        return results

    def _explain_positions(self, results: list[dict[str, Any]], positions: list[int]) -> None:
        try:
            explained = self._explain([results[position][TEXT] for position in positions])
        except Exception as exc:
            if len(positions) > 1:  # find the row that fails; explain the others
                for position in positions:
                    self._explain_positions(results, [position])
                return
            results[positions[0]][ERROR] = f"{type(exc).__name__}: {exc}"
            return
        for position, fields in zip(positions, explained, strict=True):
            results[position].update(fields)

    @torch.no_grad()
    def _explain(self, texts: list[str]) -> list[dict[str, Any]]:
        encoded = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.settings.max_length,
            return_tensors="pt",
        )
        input_ids = encoded["input_ids"].to(self.device)
        mask = encoded["attention_mask"].to(self.device)
        self._logits.clear()
        scores, deltas = {}, []
        target = None  # the predicted class, for class-specific weightings
        for method in self.settings.methods:
            if target is None and _needs_target(method.weighting):
                target = self._forward(input_ids, mask).argmax(dim=-1)
            attributions, delta = self.attribution.attribute(
                input_ids,
                target=target,
                additional_forward_args=(mask,),
                return_convergence_delta=True,
                **method.attribute_kwargs(),
            )
            scores[method.column] = attributions.float().cpu()
            deltas.append(delta.double().cpu())
        probabilities = torch.softmax(self._logits[0].double(), dim=-1).cpu()
        probability, predicted = probabilities.max(dim=-1)
        delta = torch.stack(deltas).amax(dim=0)
        real = mask.bool().cpu()
        ids_cpu = input_ids.cpu()
        rows = []
        for row in range(len(texts)):
            label = int(predicted[row])
            fields: dict[str, Any] = {
                TOKENS: self.tokenizer.convert_ids_to_tokens(ids_cpu[row][real[row]].tolist()),
                PREDICTED_LABEL: label,
                PREDICTED_LABEL_NAME: None if self.names is None else self.names.get(label),
                PROBABILITY: float(probability[row]),
                CONVERGENCE_DELTA: float(delta[row]),
            }
            for column, values in scores.items():
                fields[column] = values[row][real[row]].tolist()
            rows.append(fields)
        return rows


def _needs_target(weighting: str | None) -> bool:
    """Whether a weighting explains a class (then the predicted class is explained)."""
    return weighting is not None and WEIGHTINGS[weighting].needs_gradient


def drop_done_rows(batch: pa.Table, columns: InputColumns, done_ids: pa.Array | None) -> pa.Table:
    """``batch`` without the rows whose id is in ``done_ids`` (``resume``)."""
    if done_ids is None or len(done_ids) == 0:
        return batch
    import pyarrow.compute as pc

    ids = batch.column(ROW_INDEX if columns.id is None else columns.id)
    return batch.filter(pc.invert(pc.is_in(ids, value_set=done_ids.cast(ids.type))))
