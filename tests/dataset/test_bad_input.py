"""Bad input: specific errors before any row is explained (and exit status 2 on the CLI)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from captum_effattn import explain_dataset
from captum_effattn.__main__ import main
from captum_effattn.dataset import (
    DatasetInputError,
    EngineUnavailableError,
    InputFileError,
    MissingColumnError,
    ModelLoadError,
    OutputPathError,
    RayAddressError,
    UnknownMethodError,
)
from captum_effattn.dataset.explainer import BatchExplainer
from tests.dataset.conftest import TEXTS, write_input


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any row gets explained."""

    def forbidden(self, batch):
        raise AssertionError("a row was explained before the bad input was reported")

    monkeypatch.setattr(BatchExplainer, "explain_table", forbidden)


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.csv"
    write_input(path, {"review": TEXTS, "gold": [0, 1, 0, 1, 0]})
    return path


def test_missing_column_names_it_and_lists_the_columns(source, tmp_path, tiny_model_dir, no_work):
    with pytest.raises(MissingColumnError) as caught:
        explain_dataset(source, tmp_path / "out.parquet", model=tiny_model_dir)
    message = str(caught.value)
    assert "'text'" in message
    assert "review, gold" in message
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("option", ["id_column", "label_column"])
def test_missing_id_or_label_column(source, tmp_path, tiny_model_dir, no_work, option):
    with pytest.raises(MissingColumnError, match=r"'nope'.*its columns are: review, gold"):
        explain_dataset(
            source,
            tmp_path / "o.parquet",
            text_column="review",
            model=tiny_model_dir,
            **{option: "nope"},
        )


def test_missing_input_file(tmp_path, tiny_model_dir, no_work):
    with pytest.raises(InputFileError, match="does not exist"):
        explain_dataset(tmp_path / "absent.csv", tmp_path / "o.parquet", model=tiny_model_dir)


def test_unknown_extension_lists_the_supported_ones(tmp_path, tiny_model_dir, no_work):
    path = tmp_path / "in.txt"
    path.write_text("text\nhello\n")
    with pytest.raises(
        InputFileError, match=r"unknown extension '\.txt'.*\.csv, \.jsonl, \.parquet"
    ):
        explain_dataset(path, tmp_path / "o.parquet", model=tiny_model_dir)


@pytest.mark.parametrize("name", ["in.parquet", "in.jsonl"])
def test_unreadable_file(tmp_path, tiny_model_dir, no_work, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 this is not what the extension says {{{\n")
    with pytest.raises(InputFileError, match=f"cannot read .*{name}"):
        explain_dataset(path, tmp_path / "o.parquet", model=tiny_model_dir)


def test_output_directory_must_exist(source, tmp_path, tiny_model_dir, no_work):
    with pytest.raises(OutputPathError, match=r"directory .*missing.* does not exist"):
        explain_dataset(
            source, tmp_path / "missing" / "o.parquet", text_column="review", model=tiny_model_dir
        )


def test_output_must_not_be_a_directory(source, tmp_path, tiny_model_dir, no_work):
    with pytest.raises(OutputPathError, match="is a directory"):
        explain_dataset(source, tmp_path, text_column="review", model=tiny_model_dir)


def test_unknown_method_lists_the_choices(source, tmp_path, tiny_model_dir, no_work):
    with pytest.raises(UnknownMethodError, match="'fancy'; choose from raw, effective, efficient"):
        explain_dataset(
            source,
            tmp_path / "o.parquet",
            text_column="review",
            methods="efficient,fancy",
            model=tiny_model_dir,
        )


def test_model_directory_without_a_model(source, tmp_path, no_work):
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        explain_dataset(source, tmp_path / "o.parquet", text_column="review", model=tmp_path)


def test_max_length_beyond_the_model(source, tmp_path, tiny_model_dir, no_work):
    with pytest.raises(ModelLoadError, match=r"max_length must be an int in \[2, 40\]"):
        explain_dataset(
            source,
            tmp_path / "o.parquet",
            text_column="review",
            model=tiny_model_dir,
            max_length=41,
        )


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_address_that_does_not_answer(source, tmp_path, no_work):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    # The address is checked before the model loads: this model directory does not exist.
    with pytest.raises(RayAddressError, match=f"no Ray cluster answers at {address}"):
        explain_dataset(
            source,
            tmp_path / "o.parquet",
            text_column="review",
            engine="ray",
            ray_address=address,
            model=tmp_path / "no-model",
        )
    assert not (tmp_path / "o.parquet").exists()


def test_ray_auto_address_without_a_cluster(source, tmp_path, no_work, monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized() or Path("/tmp/ray/ray_current_cluster").exists():
        pytest.skip("a Ray cluster is running on this machine")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(RayAddressError, match="cannot join a Ray cluster at auto"):
        explain_dataset(
            source,
            tmp_path / "o.parquet",
            text_column="review",
            ray_address="auto",
            model=tmp_path / "no-model",
        )
    assert not ray.is_initialized()


def test_ray_address_implies_the_ray_engine_on_the_cli(source, tmp_path, capsys, no_work):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    output = tmp_path / "o.parquet"
    argv = ["explain", "--input", str(source), "--output", str(output), "--text-column", "review"]
    assert main([*argv, "--ray-address", address]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"error: no Ray cluster answers at {address}")
    )
    assert main([*argv, "--ray-address", address, "--engine", "local"]) == 2
    assert "needs engine 'ray'" in capsys.readouterr().err


def test_cli_reports_bad_input_on_stderr_with_status_2(source, tmp_path, tiny_model_dir, capsys):
    status = main(
        [
            "explain",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o.parquet"),
            "--model",
            str(tiny_model_dir),
        ]
    )
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: column 'text' (--text-column) is not in")


def test_every_error_is_a_value_error():
    for error in (
        InputFileError,
        MissingColumnError,
        OutputPathError,
        RayAddressError,
        EngineUnavailableError,
    ):
        assert issubclass(error, DatasetInputError)
        assert issubclass(error, ValueError)
