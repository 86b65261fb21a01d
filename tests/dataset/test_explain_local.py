"""explain_dataset on the local engine: round trips, schema, error rows, interruption."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from captum_effattn import explain_dataset, load_attributions
from captum_effattn.dataset.explainer import BatchExplainer
from tests.dataset.conftest import TEXTS, attribute_one, write_input

METHODS = ("efficient", "raw", "effective")


@pytest.fixture(scope="module")
def explained(tiny_model_dir, tmp_path_factory):
    """TEXTS explained with every view, in batches of 2 (so rows are padded)."""
    directory = tmp_path_factory.mktemp("explained")
    source, output = directory / "in.parquet", directory / "out.parquet"
    write_input(source, {"text": TEXTS})
    summary = explain_dataset(
        source,
        output,
        model=tiny_model_dir,
        methods=",".join(METHODS),
        batch_size=2,
        progress=False,
    )
    return summary, output


def test_schema_has_documented_columns_and_types(explained):
    _, output = explained
    schema = pq.read_schema(output)
    expected = [
        ("id", pa.int64()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.string())),
        ("scores_efficient", pa.list_(pa.float32())),
        ("scores_raw", pa.list_(pa.float32())),
        ("scores_effective", pa.list_(pa.float32())),
        ("predicted_label", pa.int64()),
        ("predicted_label_name", pa.string()),
        ("probability", pa.float32()),
        ("convergence_delta", pa.float64()),
        ("error", pa.string()),
    ]
    assert [(field.name, field.type) for field in schema] == expected


def test_load_attributions_equals_attribute_on_each_text(explained, tiny_model_dir):
    summary, output = explained
    rows = load_attributions(output)
    assert summary.rows_written == summary.rows_explained == len(TEXTS) == len(rows)
    assert summary.rows_with_errors == 0
    assert [row.id for row in rows] == list(range(len(TEXTS)))  # the row index
    for row, text in zip(rows, TEXTS, strict=True):
        assert row.text == text
        assert row.error is None
        assert set(row.scores) == set(METHODS)
        deltas = []
        for view in METHODS:
            tokens, scores, delta = attribute_one(tiny_model_dir, text, view)
            assert row.tokens == tokens
            assert row.tokens[0] == "[CLS]"
            assert row.tokens[-1] == "[SEP]"
            assert row.scores[view].dtype == torch.float32
            torch.testing.assert_close(row.scores[view], scores, atol=1e-6, rtol=0)
            deltas.append(delta)
        assert row.convergence_delta == pytest.approx(max(deltas), abs=1e-9)


def test_rows_read_like_mappings_too(explained):
    _, output = explained
    row = load_attributions(output)[1]
    assert row["tokens"] == row.tokens
    assert row["scores_efficient"] is row.scores["efficient"]
    assert row["predicted_label"] == row.predicted_label
    with pytest.raises(KeyError):
        row["nope"]


def test_prediction_comes_from_the_model(explained, tiny_model_dir):
    import transformers as tf

    _, output = explained
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    probabilities = logits.softmax(-1)
    for row, expected in zip(load_attributions(output), probabilities, strict=True):
        assert row.predicted_label == int(expected.argmax())
        assert row.predicted_label_name == ("negative", "positive")[row.predicted_label]
        assert row.probability == pytest.approx(float(expected.max()), abs=1e-5)


def test_efficient_scores_are_distributions_that_differ_from_raw(explained):
    _, output = explained
    longest = max(load_attributions(output), key=lambda row: len(row.tokens))
    assert len(longest.tokens) > 9  # longer than a head's value width + 1: not identifiable
    assert float(longest.scores["efficient"].sum()) == pytest.approx(1.0, abs=1e-5)
    assert (longest.scores["efficient"] >= 0).all()
    assert not torch.allclose(longest.scores["efficient"], longest.scores["raw"], atol=1e-4)


def test_rows_that_cannot_be_explained_get_an_error_and_the_run_goes_on(tmp_path, tiny_model_dir):
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    source.write_bytes(
        b"id,text\n"
        b"a,the movie was great\n"
        b"b,\n"
        b'c,"   "\n'
        b"d,the plot \xff\xfe was bad\n"
        b"e,awful acting\n"
    )
    summary = explain_dataset(source, output, id_column="id", model=tiny_model_dir, progress=False)
    rows = {row.id: row for row in load_attributions(output)}
    assert list(rows) == ["a", "b", "c", "d", "e"]
    assert summary.rows_written == 5
    assert summary.rows_with_errors == 3
    assert rows["b"].error == "empty text"
    assert rows["c"].error == "empty text"
    assert "not valid UTF-8" in rows["d"].error
    assert "\ufffd" in rows["d"].text
    for key in "bcd":
        assert rows[key].tokens == []
        assert rows[key].scores == {}
        assert rows[key].predicted_label is None
        assert rows[key].probability is None
    for key in "ae":
        assert rows[key].error is None
        assert len(rows[key].scores["efficient"]) > 2


def test_null_and_non_string_texts_are_error_rows(tmp_path, tiny_model_dir):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    source.write_text('{"text": "good fun"}\n{"text": null}\n{"other": 1}\n')
    explain_dataset(source, output, model=tiny_model_dir, progress=False)
    errors = [row.error for row in load_attributions(output)]
    assert errors == [None, "missing text (null)", "missing text (null)"]


def test_a_row_whose_explanation_fails_is_isolated(tmp_path, tiny_model_dir, monkeypatch):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS})
    original = BatchExplainer._explain

    def failing(self, texts):
        if "awful" in texts:
            raise RuntimeError("cannot explain this one")
        return original(self, texts)

    monkeypatch.setattr(BatchExplainer, "_explain", failing)
    summary = explain_dataset(source, output, model=tiny_model_dir, batch_size=5, progress=False)
    rows = load_attributions(output)
    assert summary.rows_with_errors == 1
    assert [row.error for row in rows] == [
        None,
        None,
        None,
        "RuntimeError: cannot explain this one",
        None,
    ]


def test_label_column_and_string_ids_are_copied(reviews_csv, tmp_path, tiny_model_dir):
    output = tmp_path / "out.parquet"
    explain_dataset(
        reviews_csv,
        output,
        text_column="review",
        id_column="doc_id",
        label_column="gold",
        model=tiny_model_dir,
        max_length=8,
        progress=False,
    )
    table = pq.read_table(output)
    assert table.schema.field("id").type == pa.string()
    assert table.column_names[:3] == ["id", "text", "label"]
    assert table.column("label").to_pylist() == [1, 0, 1, 0, 1]
    assert max(len(tokens) for tokens in table.column("tokens").to_pylist()) == 8


def _leftovers(directory):
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def _interrupt_after(monkeypatch, calls: int) -> None:
    original = BatchExplainer.explain_table
    seen = []

    def interrupted(self, batch):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(BatchExplainer, "explain_table", interrupted)


def test_an_interrupted_run_leaves_no_file(tmp_path, tiny_model_dir, monkeypatch):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS})
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(source, output, model=tiny_model_dir, batch_size=1, progress=False)
    assert not output.exists()
    assert _leftovers(tmp_path) == []


def test_an_interrupted_write_keeps_the_previous_output(tmp_path, tiny_model_dir, monkeypatch):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS})
    explain_dataset(source, output, model=tiny_model_dir, progress=False)
    before = output.read_bytes()

    def interrupted_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(source, output, model=tiny_model_dir, methods="raw", progress=False)
    assert output.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_checkpoints_let_resume_finish_an_interrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS})
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(
            source, output, model=tiny_model_dir, batch_size=1, checkpoint_rows=2, progress=False
        )
    assert [row.id for row in load_attributions(output)] == [0, 1]  # the last checkpoint
    monkeypatch.undo()
    summary = explain_dataset(source, output, model=tiny_model_dir, resume=True, progress=False)
    assert (summary.rows_kept, summary.rows_explained, summary.rows_written) == (2, 3, 5)
    assert [row.id for row in load_attributions(output)] == [0, 1, 2, 3, 4]


def test_a_decoder_classifier_without_a_pad_token(tmp_path):
    import transformers as tf

    from tests.dataset.conftest import SPECIAL, WORDS

    directory = tmp_path / "gpt2"
    tokens = SPECIAL + list(WORDS)
    tokenizer = tf.BertTokenizerFast(vocab={token: index for index, token in enumerate(tokens)})
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    config = tf.GPT2Config(
        vocab_size=len(tokens), n_embd=32, n_layer=2, n_head=4, n_positions=40, num_labels=2
    )
    torch.manual_seed(0)
    tf.GPT2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS})
    summary = explain_dataset(source, output, model=directory, batch_size=5, progress=False)
    assert summary.rows_with_errors == 0
    for row, text in zip(load_attributions(output), TEXTS, strict=True):
        assert len(row.tokens) == len(row.scores["efficient"]) == len(text.split()) + 2
        assert float(row.scores["efficient"].sum()) == pytest.approx(1.0, abs=1e-5)


def test_weighted_methods_explain_the_predicted_class(tmp_path, tiny_model_dir):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS[:3]})
    summary = explain_dataset(
        source,
        output,
        model=tiny_model_dir,
        methods="efficient+gradient,raw+norm",
        batch_size=2,
        progress=False,
    )
    assert summary.rows_with_errors == 0
    rows = load_attributions(output)
    for row in rows:
        assert set(row.scores) == {"efficient+gradient", "raw+norm"}
        assert all(bool(torch.isfinite(s).all()) for s in row.scores.values())
        assert row.scores["efficient+gradient"].abs().sum() > 0
