"""The default model: the package's fine-tuned MiniLM (cached), on real IMDB text."""

from __future__ import annotations

import pytest
import torch

from captum_effattn import explain_dataset, load_attributions
from tests.dataset.conftest import write_input

pytestmark = pytest.mark.slow


def test_default_model_explains_reviews(sentiment_classifier, tmp_path, long_imdb_review):
    texts = ["A gorgeous, moving film.", "Dull and far too long.", long_imdb_review]
    source, output = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_input(source, {"text": texts})
    summary = explain_dataset(source, output, max_length=64, batch_size=3, progress=False)
    assert summary.rows_with_errors == 0
    rows = load_attributions(output)
    model, tokenizer = sentiment_classifier.model, sentiment_classifier.tokenizer
    with torch.no_grad():
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        probabilities = model(**encoded).logits.softmax(-1)
    for row, expected in zip(rows, probabilities, strict=True):
        assert row.predicted_label == int(expected.argmax())
        assert row.predicted_label_name == sentiment_classifier.labels[row.predicted_label]
        assert row.probability == pytest.approx(float(expected.max()), abs=1e-5)
        assert float(row.scores["efficient"].sum()) == pytest.approx(1.0, abs=1e-4)
        assert row.convergence_delta < 1e-4
    assert len(rows[2].tokens) == 64
    import pyarrow.parquet as pq

    from captum_effattn.dataset.schema import read_metadata

    name = read_metadata(pq.read_schema(output))["model"]["name"]
    assert name == "captum_effattn:" + sentiment_classifier.metadata["directory"].split("/")[-1]
