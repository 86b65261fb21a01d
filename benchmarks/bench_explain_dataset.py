"""Dataset benchmark: rows/s of ``explain_dataset`` on the local engine and on a local Ray cluster.

Explains ``--rows`` held-out IMDB reviews (each at least 256 MiniLM word pieces, truncated to
``--max-length``, 256 by default) with the fine-tuned MiniLM sentiment classifier and efficient
attention, once per engine, into Parquet. The Ray cluster is started before the clock starts (its
start-up is printed apart); the Ray time includes loading the model in each actor. Prints torch
threads and the load average, since other work on the machine changes the numbers.

Run: ``PYTHONPATH=. python benchmarks/bench_explain_dataset.py [--rows 2000] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_reviews(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from captum_effattn.data import imdb_heldout

    reviews = imdb_heldout(rows + rows % 2)[:rows]
    table = pa.table(
        {"text": [review.text for review in reviews], "label": [review.label for review in reviews]}
    )
    pq.write_table(table, path)


def run(engine: str, source: Path, directory: Path, args) -> None:
    from benchmarks.timing import load_average, machine_line
    from captum_effattn import explain_dataset

    print(f"\n{engine} engine: {machine_line()}")
    summary = explain_dataset(
        source,
        directory / f"{engine}.parquet",
        label_column="label",
        methods=args.methods,
        batch_size=args.batch_size,
        max_length=args.max_length,
        engine=engine,
        progress=not args.no_progress,
        ray_actors=args.ray_actors,
    )
    print(summary)
    print(f"{engine}: {summary.rows_per_second:.2f} rows/s; after: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="32 rows, to check the script runs")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", default="efficient")
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--ray-actors", type=int, help="default: one per CPU but one")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    rows = 32 if args.quick else args.rows

    from captum_effattn.data import load_sentiment_classifier

    load_sentiment_classifier()  # build the cache first, outside the clock
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        source = directory / "imdb.parquet"
        write_reviews(source, rows)
        print(f"{rows} IMDB reviews, max_length {args.max_length}, batch {args.batch_size}")
        for engine in args.engines.split(","):
            if engine == "ray":
                import ray

                from captum_effattn.dataset.engine_ray import start_local_cluster

                start = time.perf_counter()
                start_local_cluster(args.ray_cpus)
                print(
                    f"\nlocal Ray cluster of {args.ray_cpus} CPUs started in "
                    f"{time.perf_counter() - start:.1f} s"
                )
                try:
                    run(engine, source, directory, args)
                finally:
                    ray.shutdown()
            else:
                run(engine, source, directory, args)


if __name__ == "__main__":
    main()
