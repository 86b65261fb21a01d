"""The Ray Data engine: read with ``ray.data``, explain in an actor pool (one model per actor,
one GPU each when CUDA is present), write Parquet parts, gather them into one file.

Imported only for ``engine="ray"``. Rows keep their input order: each row carries its input
position (zipped from ``ray.data.range``), and the gathered parts are sorted by it.

With ``address=None`` a local cluster is started (its workers import this package from the same
place as the driver) and shut down at the end; an address joins a running cluster, which must
have ``captum_effattn`` installed and see the output's directory (the parts are written there).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from captum_effattn.dataset.errors import RayAddressError
from captum_effattn.dataset.explainer import BatchExplainer, ExplainerSettings, drop_done_rows
from captum_effattn.dataset.io import csv_convert_options, input_format
from captum_effattn.dataset.schema import ROW_INDEX

PROBE_TIMEOUT_S = 5.0
"""How long a Ray address may take to accept a connection (``ray.init`` itself waits minutes)."""
DEFAULT_RAY_PORT = 6379
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def probe_address(address: str) -> None:
    """Raise :class:`RayAddressError` unless ``host:port`` (or ``ray://host:port``) accepts a
    TCP connection within :data:`PROBE_TIMEOUT_S`. ``auto`` and ``local`` are left to Ray."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port or DEFAULT_RAY_PORT
    except ValueError as exc:
        raise RayAddressError(f"Ray address {address!r} is not host:port ({exc})") from None
    if not host:
        raise RayAddressError(f"Ray address {address!r} is not host:port")
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayAddressError(
            f"no Ray cluster answers at {address} ({host}:{port}: {exc}); start one with "
            "`ray start --head` or leave out --ray-address for a local cluster"
        ) from None


def start_local_cluster(num_cpus: int | None = None) -> None:
    """Start a local Ray cluster whose workers import ``captum_effattn`` from where the driver
    does (a checkout works as well as an installed package)."""
    paths = [PACKAGE_PARENT, os.environ.get("PYTHONPATH", "")]
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}},
    )


class RayBatchExplainer:
    """The actor class of ``map_batches``: loads the model once, explains pyarrow batches."""

    def __init__(self, settings: ExplainerSettings, done_ids: pa.Array | None, threads: int):
        torch.set_num_threads(threads)
        self.explainer = BatchExplainer(settings)
        self.done_ids = done_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        settings = self.explainer.settings
        batch = drop_done_rows(batch, settings.columns, self.done_ids)
        if batch.num_rows == 0:
            return settings.layout.with_row_index().empty_table()
        return self.explainer.explain_table(batch)


class RayEngine:
    """Explains a file on a Ray cluster; a context manager that shuts down only what it started.

    Entering joins the cluster at ``address`` (so a wrong address fails before any work); with no
    address, :meth:`run` starts a local cluster (after every other check has passed). Leaving
    shuts down the cluster it started, or disconnects from the one it joined; a Ray session
    that was already running is left alone.

    Args:
        address: a running cluster (its port is probed now), or ``None`` for a local one.
        progress: show Ray Data's progress bars.
    """

    def __init__(self, address: str | None, progress: bool = True) -> None:
        if address is not None:
            probe_address(address)
        self.address, self.progress = address, progress
        self.started = False

    def __enter__(self) -> RayEngine:
        if self.address is not None and not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False)
            except ConnectionError as exc:
                raise RayAddressError(
                    f"cannot join a Ray cluster at {self.address}: {exc}"
                ) from None
            self.started = True
        return self

    def __exit__(self, *exc_info) -> None:
        if self.started:
            ray.shutdown()
            self.started = False

    def run(
        self,
        settings: ExplainerSettings,
        input_path: Path,
        output_path: Path,
        done_ids: pa.Array | None,
        actors: int | None = None,
        num_cpus: int | None = None,
    ) -> pa.Table:
        """The explained rows (output layout plus row index) in input order."""
        if not ray.is_initialized():
            start_local_cluster(num_cpus)
            self.started = True
        return self._run(settings, input_path, output_path, done_ids, actors)

    def _run(self, settings, input_path, output_path, done_ids, actors) -> pa.Table:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = self.progress
        dataset = _read(input_path, settings.columns.text)
        index = ray.data.range(dataset.count()).rename_columns({"id": ROW_INDEX})
        with warnings.catch_warnings():
            # Deprecated in Ray 2.60 (removed in 2.64, hence the extra's bound), and the one public
            # way to number the rows of a file read in parallel; preserve_order keeps it exact.
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.zip(index)
        pool, threads, gpus = _actor_pool(actors)
        explained = dataset.map_batches(
            RayBatchExplainer,
            fn_constructor_kwargs={"settings": settings, "done_ids": done_ids, "threads": threads},
            batch_size=settings.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool),
            num_cpus=1,
            num_gpus=1 if gpus else 0,
        )
        parts = tempfile.mkdtemp(prefix=f".{output_path.name}.ray-", dir=output_path.parent)
        try:
            explained.write_parquet(parts)
            return _gather(Path(parts), settings.layout.with_row_index())
        finally:
            shutil.rmtree(parts, ignore_errors=True)


def _actor_pool(actors: int | None) -> tuple[int, int, int]:
    """``(actors, torch threads per actor, GPUs)``: one actor per GPU, else one per CPU but one
    (reading and writing tasks need a CPU, or the pipeline waits for ever on a full cluster)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if torch.cuda.is_available() else 0
    cpus = max(1, int(resources.get("CPU", 1)))
    pool = actors or gpus or max(1, cpus - 1)
    threads = 1 if gpus else max(1, cpus // pool)
    return pool, threads, gpus


def _read(path: Path, text_column: str) -> ray.data.Dataset:
    fmt = input_format(path)
    if fmt == "csv":
        return ray.data.read_csv(str(path), convert_options=csv_convert_options(text_column))
    if fmt == "jsonl":
        return ray.data.read_json(str(path), lines=True)
    return ray.data.read_parquet(str(path))


def _gather(parts: Path, schema: pa.Schema) -> pa.Table:
    files = sorted(parts.glob("*.parquet"))
    tables = [pq.read_table(file).cast(schema) for file in files]
    tables = [table for table in tables if table.num_rows]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables).sort_by(ROW_INDEX)
