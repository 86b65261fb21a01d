"""The Ray Data engine equals the local engine; one local 2-CPU cluster for the whole module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from captum_effattn import explain_dataset, load_attributions
from tests.dataset.conftest import TEXTS, write_input

ray = pytest.importorskip("ray")
engine_ray = pytest.importorskip("captum_effattn.dataset.engine_ray")

ROOT = Path(__file__).resolve().parents[2]
# Ray Data's own DataContext warns about its deprecated fields when it is copied to the workers.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two CPUs (started once; the engine joins it and leaves it up)."""
    if ray.is_initialized():
        ray.shutdown()
    engine_ray.start_local_cluster(num_cpus=2)
    yield
    ray.shutdown()


def _both_engines(source, directory, **settings):
    local, distributed = directory / "local.parquet", directory / "ray.parquet"
    explain_dataset(source, local, progress=False, **settings)
    summary = explain_dataset(source, distributed, engine="ray", progress=False, **settings)
    assert ray.is_initialized()  # the engine did not shut down the cluster it did not start
    return pq.read_table(local), pq.read_table(distributed), summary


def _assert_same_rows(local, distributed):
    assert distributed.schema.equals(local.schema, check_metadata=True)
    float_columns = [name for name in local.column_names if name.startswith("scores_")]
    float_columns += ["probability", "convergence_delta"]
    exact = [name for name in local.column_names if name not in float_columns]
    assert distributed.select(exact).equals(local.select(exact))  # same rows, same order
    for a, b in zip(local.to_pylist(), distributed.to_pylist(), strict=True):
        for column in float_columns:
            if a[column] is None:
                assert b[column] is None
            else:
                assert b[column] == pytest.approx(a[column], abs=1e-6, rel=0)


def test_ray_equals_local_on_csv(cluster, tmp_path, tiny_model_dir):
    source = tmp_path / "in.csv"
    texts = [*TEXTS, "", *TEXTS[::-1]]
    write_input(
        source,
        {
            "key": [f"k{i}" for i in range(len(texts))],
            "text": texts,
            "gold": list(range(len(texts))),
        },
    )
    local, distributed, summary = _both_engines(
        source,
        tmp_path,
        model=tiny_model_dir,
        id_column="key",
        label_column="gold",
        methods="efficient,raw",
        batch_size=3,
    )
    assert local.num_rows == distributed.num_rows == len(texts)
    assert (summary.rows_explained, summary.rows_with_errors, summary.engine) == (11, 1, "ray")
    _assert_same_rows(local, distributed)


def test_ray_resume_on_jsonl_skips_done_ids(cluster, tmp_path, tiny_model_dir):
    head, full = tmp_path / "head.jsonl", tmp_path / "full.jsonl"
    write_input(head, {"text": TEXTS[:2]})
    write_input(full, {"text": TEXTS})
    settings = {"model": tiny_model_dir, "progress": False}
    explain_dataset(head, tmp_path / "ray.parquet", **settings)
    summary = explain_dataset(full, tmp_path / "ray.parquet", engine="ray", resume=True, **settings)
    assert (summary.rows_kept, summary.rows_explained, summary.rows_written) == (2, 3, 5)
    explain_dataset(full, tmp_path / "local.parquet", **settings)
    _assert_same_rows(
        pq.read_table(tmp_path / "local.parquet"), pq.read_table(tmp_path / "ray.parquet")
    )
    assert [row.id for row in load_attributions(tmp_path / "ray.parquet")] == [0, 1, 2, 3, 4]


def test_engine_shuts_down_only_the_cluster_it_started(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(engine_ray.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(engine_ray, "start_local_cluster", lambda n: calls.append(("start", n)))
    monkeypatch.setattr(engine_ray.ray, "shutdown", lambda: calls.append("shutdown"))

    def failing_run(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_ray.RayEngine, "_run", failing_run)
    with pytest.raises(KeyboardInterrupt), engine_ray.RayEngine(None) as engine:
        engine.run(None, tmp_path / "in.csv", tmp_path / "o.parquet", None)
    assert calls == [("start", None), "shutdown"]


def test_ray_is_imported_only_for_the_ray_engine():
    code = (
        "import sys, captum_effattn\n"
        "from captum_effattn import explain_dataset, load_attributions\n"
        "from captum_effattn.__main__ import build_parser\n"
        "build_parser()\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
