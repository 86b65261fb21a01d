"""``python -m captum_effattn explain``: round trips through every input format."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captum_effattn import load_attributions
from captum_effattn.__main__ import main
from tests.dataset.conftest import TEXTS, write_input

ROOT = Path(__file__).resolve().parents[2]
IDS = [10, 11, 12, 13, 14]
GOLD = ["pos", "neg", "pos", "neg", "pos"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_round_trip(tmp_path, tiny_model_dir, capsys, suffix):
    source, output = tmp_path / f"in{suffix}", tmp_path / "out.parquet"
    write_input(source, {"key": IDS, "body": TEXTS, "gold": GOLD})
    status = main(
        [
            "explain",
            "--input",
            str(source),
            "--output",
            str(output),
            "--text-column",
            "body",
            "--id-column",
            "key",
            "--label-column",
            "gold",
            "--model",
            str(tiny_model_dir),
            "--methods",
            "efficient,raw",
            "--batch-size",
            "2",
            "--max-length",
            "12",
            "--no-progress",
        ]
    )
    assert status == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith(f"wrote 5 rows to {output}: 5 explained now, 0 with errors;")
    assert "rows/s" in summary
    table = pq.read_table(output)
    assert table.column_names == [
        "id",
        "text",
        "label",
        "tokens",
        "scores_efficient",
        "scores_raw",
        "predicted_label",
        "predicted_label_name",
        "probability",
        "convergence_delta",
        "error",
    ]
    assert table.schema.field("id").type == pa.int64()
    assert table.column("label").to_pylist() == GOLD
    rows = load_attributions(output)
    assert [row.id for row in rows] == IDS
    assert [row.text for row in rows] == TEXTS
    assert [row.label for row in rows] == GOLD
    for row in rows:
        assert 3 <= len(row.tokens) <= 12
        assert len(row.scores["efficient"]) == len(row.scores["raw"]) == len(row.tokens)


def test_module_help_lists_explain():
    result = subprocess.run(
        [sys.executable, "-m", "captum_effattn", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "explain" in result.stdout


def test_subprocess_run_shows_progress_and_ends_with_a_summary(tmp_path, other_model_dir):
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    write_input(source, {"text": [*TEXTS, ""]})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "captum_effattn",
            "explain",
            "--input",
            str(source),
            "--output",
            str(output),
            "--model",
            str(other_model_dir),
            "--methods",
            "raw",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "row/s" in result.stderr  # the tqdm bar
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"wrote 6 rows to {output}: 6 explained now, 1 with errors;")
    rows = load_attributions(output)
    assert rows[-1].error == "empty text"
    # The config names its labels only LABEL_<i>: no label names.
    assert {row.predicted_label_name for row in rows} == {None}
    assert {row.predicted_label for row in rows[:-1]} <= {0, 1, 2}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_no_partial_file(tmp_path, tiny_model_dir):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_input(source, {"text": TEXTS * 2000})
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "captum_effattn",
            "explain",
            "--input",
            str(source),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--checkpoint-rows",
            "0",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # A child inherits an ignored SIGINT (and Python then never raises KeyboardInterrupt):
        # start it as a terminal would, whatever an earlier test left in this process.
        preexec_fn=_default_sigint,
    )
    try:
        for line in iter(process.stderr.readline, ""):  # wait until rows are being explained
            if "explaining:" in line and " 0/" not in line:
                break
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.parquet"]
