"""--resume: skip ids already written, refuse outputs written with other settings."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captum_effattn import explain_dataset, load_attributions
from captum_effattn.dataset import ResumeMismatchError
from captum_effattn.dataset.explainer import BatchExplainer
from tests.dataset.conftest import TEXTS, write_input


@pytest.fixture
def first_run(tmp_path, tiny_model_dir):
    """The first three texts explained (ids doc-0..doc-2), and an input of all five."""
    ids = [f"doc-{index}" for index in range(len(TEXTS))]
    head, full = tmp_path / "head.jsonl", tmp_path / "full.jsonl"
    write_input(head, {"id": ids[:3], "text": TEXTS[:3]})
    write_input(full, {"id": ids, "text": TEXTS})
    output = tmp_path / "out.parquet"
    explain_dataset(head, output, id_column="id", model=tiny_model_dir, progress=False)
    return full, output


def test_resume_explains_only_new_ids(first_run, tiny_model_dir, monkeypatch):
    full, output = first_run
    before = pq.read_table(output)
    explained = []
    original = BatchExplainer.explain_table

    def counting(self, batch):
        explained.extend(batch.column("id").to_pylist())
        return original(self, batch)

    monkeypatch.setattr(BatchExplainer, "explain_table", counting)
    summary = explain_dataset(
        full, output, id_column="id", model=tiny_model_dir, resume=True, progress=False
    )
    assert explained == ["doc-3", "doc-4"]
    assert (summary.rows_kept, summary.rows_explained, summary.rows_written) == (3, 2, 5)
    after = pq.read_table(output)
    assert after.slice(0, 3).equals(before)  # earlier rows kept as they were
    assert [row.id for row in load_attributions(output)] == [f"doc-{i}" for i in range(5)]
    assert after.schema.metadata == before.schema.metadata


def test_resume_without_an_output_runs_everything(tmp_path, tiny_model_dir):
    source = tmp_path / "in.csv"
    write_input(source, {"text": TEXTS})
    summary = explain_dataset(
        source, tmp_path / "o.parquet", model=tiny_model_dir, resume=True, progress=False
    )
    assert (summary.rows_kept, summary.rows_written) == (0, 5)


def test_without_resume_the_output_is_replaced(first_run, tiny_model_dir):
    full, output = first_run
    summary = explain_dataset(full, output, id_column="id", model=tiny_model_dir, progress=False)
    assert (summary.rows_kept, summary.rows_explained, summary.rows_written) == (0, 5, 5)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"methods": "raw"}, "methods"),
        ({"methods": "efficient,raw"}, "methods"),
        ({"max_length": 8}, "max_length"),
        ({"label_column": "text"}, "label_column"),
    ],
)
def test_resume_refuses_other_settings(first_run, tiny_model_dir, change, named):
    full, output = first_run
    before = output.read_bytes()
    settings = {"id_column": "id", "model": tiny_model_dir, "resume": True, **change}
    with pytest.raises(ResumeMismatchError, match=f"rows would mix.*{named}"):
        explain_dataset(full, output, progress=False, **settings)
    assert output.read_bytes() == before


def test_resume_refuses_another_model(first_run, other_model_dir):
    full, output = first_run
    with pytest.raises(ResumeMismatchError, match=r"model: .*other-classifier"):
        explain_dataset(
            full, output, id_column="id", model=other_model_dir, resume=True, progress=False
        )


def test_resume_refuses_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    source, output = tmp_path / "in.csv", tmp_path / "o.parquet"
    write_input(source, {"text": TEXTS})
    pq.write_table(pa.table({"id": [0]}), output)
    with pytest.raises(ResumeMismatchError, match="not written by captum_effattn"):
        explain_dataset(source, output, model=tiny_model_dir, resume=True, progress=False)
