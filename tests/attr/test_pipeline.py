"""Layers projected on a worker thread while the forward pass runs give what projecting after it
gives, and no work outlives the call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from captum_effattn import EfficientAttentionAttribution
from captum_effattn.attr._pipeline import LayerPipeline, spare_core
from captum_effattn.attr._queries import select_query_rows
from captum_effattn.attr._views import View, get_view, project_rows
from captum_effattn.models import capture_attention, select_heads
from tests.attr.helpers import text_setup
from tests.models.tiny import NUM_HEADS, NUM_LAYERS


@pytest.fixture(autouse=True)
def _spare_core(monkeypatch):
    """These tests exercise the worker: act as if PyTorch left it a core (one test undoes it)."""
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "spare_core", lambda: True)


# The heads _pipelined_and_after selects, and how many that is per layer.
SELECTION = {0: "all", 1: [1, 3], 2: "all"}
SELECTED_PER_LAYER = [NUM_HEADS, 2, NUM_HEADS]


def _pipelined_and_after(name, query, view, padding="right"):
    model, forward, ids, mask = text_setup(name, padding)
    pipeline = LayerPipeline(query, get_view(view))
    selection = select_heads(model, heads=SELECTION)
    try:
        with (
            capture_attention(model, selection, materialize=False, on_layer=pipeline.submit) as rec,
            torch.no_grad(),
        ):
            forward(ids, mask)
        captured = rec.layers
        queries = select_query_rows(query, captured[0].key_mask, captured[0].causal)
        pipelined = pipeline.results(captured, queries)
    finally:
        pipeline.close()
    return pipelined, project_rows(captured, queries, get_view(view))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("query", ["auto", "all", 3])
@pytest.mark.parametrize("view", ["efficient", "effective", "raw"])
def test_pipelined_rows_equal_rows_projected_after_the_forward(name, query, view):
    pipelined, after = _pipelined_and_after(name, query, view)
    assert [rows.shape[1] for rows, _ in pipelined] == SELECTED_PER_LAYER
    rows = torch.cat([rows for rows, _ in pipelined], dim=1)
    errors = torch.cat([error for _, error in pipelined], dim=1)
    torch.testing.assert_close(rows, after.rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(errors, after.output_error, rtol=0, atol=1e-9)
    if view == "efficient":
        assert (errors <= 1e-9).all()


@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("query", ["auto", "all"])
def test_layers_projected_in_runs_equal_layers_projected_together(monkeypatch, name, query):
    """Past :data:`TOGETHER_BYTES`, layers go in runs of equal numbers: same rows, same order."""
    import captum_effattn.attr._views as views

    model, forward, ids, mask = text_setup(name)
    with capture_attention(model, materialize=False) as rec, torch.no_grad():
        forward(ids, mask)
    captured = rec.layers
    queries = select_query_rows(query, captured[0].key_mask, captured[0].causal)
    view = get_view("efficient")
    together = views.project_layers(captured, queries, view)
    one_layer = views._concatenated_bytes(captured[0], queries)
    runs = []
    real_together = views._project_together
    monkeypatch.setattr(
        views,
        "_project_together",
        lambda layers, *args: runs.append(len(layers)) or real_together(layers, *args),
    )
    monkeypatch.setattr(views, "TOGETHER_BYTES", 2 * one_layer)
    in_runs = views.project_layers(captured, queries, view)
    assert runs == [2] * (NUM_LAYERS // 2) + [NUM_LAYERS % 2] * (NUM_LAYERS % 2)
    assert len(in_runs) == len(together) == NUM_LAYERS
    for (rows, error), (rows_together, error_together) in zip(in_runs, together, strict=True):
        torch.testing.assert_close(rows, rows_together, rtol=0, atol=1e-12)
        torch.testing.assert_close(error, error_together, rtol=0, atol=1e-9)


def test_each_layer_is_handed_over_before_the_next_one_runs():
    model, forward, ids, mask = text_setup("bert")
    events = []
    layers = model.bert.encoder.layer
    handles = [
        layer.attention.self.register_forward_pre_hook(lambda *_, i=i: events.append(("runs", i)))
        for i, layer in enumerate(layers)
    ]
    try:
        with (
            capture_attention(
                model, on_layer=lambda c: events.append(("handed", c.layer)), materialize=False
            ),
            torch.no_grad(),
        ):
            forward(ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    assert events == [(kind, i) for i in range(NUM_LAYERS) for kind in ("runs", "handed")]


def test_closing_waits_for_every_batch_even_when_results_are_never_asked():
    model, forward, ids, mask = text_setup("llama")
    pipeline = LayerPipeline("all", get_view("efficient"))
    with capture_attention(model, materialize=False, on_layer=pipeline.submit), torch.no_grad():
        forward(ids, mask)
    assert pipeline._jobs
    pipeline.close()
    assert all(batch.done.is_set() for batch in pipeline._batches)
    assert pipeline._waiting == []  # a job starting now would find nothing to take


def _blocked_worker(release: threading.Event) -> ThreadPoolExecutor:
    """A one-thread executor whose thread is stuck in someone else's job until ``release``."""
    executor = ThreadPoolExecutor(max_workers=1)
    started = threading.Event()

    def stuck():
        started.set()
        release.wait(60)

    executor.submit(stuck)
    started.wait(10)
    return executor


@pytest.mark.parametrize("view", ["efficient", "raw"])
def test_the_caller_does_the_work_of_a_worker_that_never_starts(monkeypatch, view):
    """A starved or busy worker must not hold the caller: it projects what was not taken."""
    import captum_effattn.attr._pipeline as pipeline

    model, forward, ids, mask = text_setup("gpt2", "left")
    explainer = EfficientAttentionAttribution(forward, model=model)
    expected = explainer.attribute(ids, additional_forward_args=(mask,), view=view)
    release = threading.Event()
    executor = _blocked_worker(release)
    monkeypatch.setattr(pipeline, "_worker", lambda: executor)
    result = {}
    caller = threading.Thread(
        target=lambda: result.update(
            scores=explainer.attribute(ids, additional_forward_args=(mask,), view=view)
        )
    )
    try:
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), "attribute waited for a worker that never started"
    finally:
        release.set()
        executor.shutdown(wait=True)
    torch.testing.assert_close(result["scores"], expected, rtol=0, atol=0)


def test_a_batch_the_worker_is_projecting_is_waited_for_and_used(monkeypatch):
    import captum_effattn.attr._pipeline as pipeline

    model, forward, ids, mask = text_setup("bert")
    expected = EfficientAttentionAttribution(forward, model=model).attribute(
        ids, additional_forward_args=(mask,)
    )
    project = pipeline.project_layers
    on_worker = []
    taken = threading.Event()

    def slow_on_the_worker(layers, queries, view):
        if threading.current_thread() is not threading.main_thread():
            on_worker.append(len(layers))
            taken.set()
            time.sleep(0.2)
        return project(layers, queries, view)

    def forward_then_let_the_worker_start(ids, mask):
        logits = forward(ids, mask)
        assert taken.wait(30)  # the worker is inside a batch when the forward returns
        return logits

    monkeypatch.setattr(pipeline, "project_layers", slow_on_the_worker)
    explainer = EfficientAttentionAttribution(forward_then_let_the_worker_start, model=model)
    scores = explainer.attribute(ids, additional_forward_args=(mask,))
    assert on_worker  # the worker did take a batch, and its rows were used
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


def test_the_worker_runs_at_normal_priority():
    import os

    import captum_effattn.attr._pipeline as pipeline

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert pipeline._worker().submit(niceness).result() == niceness()


def test_a_query_that_does_not_resolve_submits_nothing():
    model, forward, ids, mask = text_setup("bert")
    pipeline = LayerPipeline(99, get_view("efficient"))
    with capture_attention(model, materialize=False, on_layer=pipeline.submit), torch.no_grad():
        forward(ids, mask)
    assert pipeline._jobs == []
    # The attribution then raises the query's own error.
    with pytest.raises(ValueError, match="query position 99 is out of range"):
        EfficientAttentionAttribution(forward, model=model).attribute(
            ids, additional_forward_args=(mask,), query=99
        )


def test_without_a_spare_core_every_layer_is_projected_after_the_forward(monkeypatch):
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "spare_core", lambda: False)
    pipelined, after = _pipelined_and_after("bert", "auto", "efficient")
    rows = torch.cat([rows for rows, _ in pipelined], dim=1)
    torch.testing.assert_close(rows, after.rows, rtol=0, atol=1e-12)
    model, forward, ids, mask = text_setup("bert")
    lazy = LayerPipeline("auto", get_view("efficient"))
    with capture_attention(model, materialize=False, on_layer=lazy.submit), torch.no_grad():
        forward(ids, mask)
    assert lazy._jobs == []  # no worker was involved
    assert lazy._waiting == []


def test_rows_read_off_the_capture_are_never_handed_to_the_worker():
    model, forward, ids, mask = text_setup("bert")
    pipeline = LayerPipeline("auto", get_view("raw"))
    with capture_attention(model, materialize=False, on_layer=pipeline.submit), torch.no_grad():
        forward(ids, mask)
    assert pipeline._jobs == []


def test_the_rest_of_the_layers_is_shared_in_portions_between_caller_and_worker(monkeypatch):
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "PORTION_ROWS", 1)  # one layer per portion
    project = pipeline.project_layers
    portions = []

    def recording(layers, queries, view):
        portions.append((threading.current_thread() is threading.main_thread(), len(layers)))
        return project(layers, queries, view)

    monkeypatch.setattr(pipeline, "project_layers", recording)
    pipelined, after = _pipelined_and_after("gpt2", "all", "efficient")
    assert [size for _, size in portions] == [1] * NUM_LAYERS
    rows = torch.cat([rows for rows, _ in pipelined], dim=1)
    torch.testing.assert_close(rows, after.rows, rtol=0, atol=1e-12)


def test_a_portion_holds_the_cls_rows_of_every_waiting_layer():
    model, forward, ids, mask = text_setup("bert")  # 2 examples x 4 heads x 1 row per layer
    pipeline = LayerPipeline("auto", get_view("efficient"))
    pipeline._queries = select_query_rows("auto", mask.bool(), False)
    with capture_attention(model, materialize=False) as rec, torch.no_grad():
        forward(ids, mask)
    pipeline._waiting = list(rec.layers)
    assert pipeline._portion() == list(rec.layers)  # 8 rows a layer, far below PORTION_ROWS


def test_spare_core_compares_torch_threads_with_the_cores_of_this_process(monkeypatch):
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert spare_core()  # the function itself: the autouse fixture replaced the module's
        torch.set_num_threads(2)
        assert not spare_core()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_threads_no_spare_core(monkeypatch, two_threads):
    """Two torch threads (the shared ``two_threads`` fixture) on as many cores: nothing overlaps
    the forward pass."""
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "spare_core", lambda: False)


def _recording_portions(monkeypatch, fail_on_caller=False):
    """Record ``(on the caller, torch threads, layers)`` of every projection call."""
    import captum_effattn.attr._pipeline as pipeline

    project = pipeline.project_layers
    calls = []

    def recording(layers, queries, view):
        on_caller = threading.current_thread() is threading.main_thread()
        calls.append((on_caller, torch.get_num_threads(), [c.layer for c in layers]))
        if fail_on_caller and on_caller:
            raise RuntimeError("a portion failed on the caller")
        return project(layers, queries, view)

    monkeypatch.setattr(pipeline, "project_layers", recording)
    return calls


@pytest.mark.usefixtures("two_threads_no_spare_core")
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_every_row_on_two_threads_is_shared_after_the_forward_a_thread_each(monkeypatch, name):
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "PORTION_ROWS", 1)  # one layer per portion
    calls = _recording_portions(monkeypatch)
    pipelined, after = _pipelined_and_after(name, "all", "efficient")
    assert sorted(layer for _, _, layers in calls for layer in layers) == list(range(NUM_LAYERS))
    assert all(layers == [layers[0]] for _, _, layers in calls)  # whole layers, one at a time
    assert all(threads == 1 for _, threads, _ in calls)  # a thread each, caller and worker
    assert torch.get_num_threads() == 2  # the caller's setting is back
    for (rows, error), (rows_after, error_after) in zip(
        pipelined, _split_by_layer(after), strict=True
    ):
        torch.testing.assert_close(rows, rows_after, rtol=0, atol=1e-12)
        torch.testing.assert_close(error, error_after, rtol=0, atol=1e-9)


def _split_by_layer(after):
    sizes = SELECTED_PER_LAYER
    return list(zip(after.rows.split(sizes, 1), after.output_error.split(sizes, 1), strict=True))


@pytest.mark.usefixtures("two_threads_no_spare_core")
def test_a_failing_shared_portion_raises_with_the_callers_threads_restored(monkeypatch):
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "PORTION_ROWS", 1)
    _recording_portions(monkeypatch, fail_on_caller=True)
    model, forward, ids, mask = text_setup("gpt2")
    explainer = EfficientAttentionAttribution(forward, model=model)
    with pytest.raises(RuntimeError, match="a portion failed on the caller"):
        explainer.attribute(ids, additional_forward_args=(mask,), query="all")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("threads", "query"), [(1, "auto"), (1, "all"), (2, "auto"), (3, "auto"), (3, "all")]
)
def test_other_thread_counts_and_cls_rows_keep_the_solvers_own_threads(monkeypatch, threads, query):
    """Sharing after the forward is for every row on two threads only: otherwise one call
    projects every layer on all the caller's threads."""
    import captum_effattn.attr._pipeline as pipeline

    monkeypatch.setattr(pipeline, "spare_core", lambda: False)
    calls = _recording_portions(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _pipelined_and_after("bert", query, "efficient")
    finally:
        torch.set_num_threads(before)
    assert calls == [(True, threads, [0, 1, 2])]


@pytest.mark.parametrize(("query", "torch_threads"), [("auto", 1), ("all", 2)])
def test_small_projections_run_pytorch_on_one_thread_and_the_solver_on_the_callers(
    two_threads, monkeypatch, query, torch_threads
):
    """The [CLS] rows of a small batch: PyTorch's small operations on one thread (a hand-off to
    the second costs more than they do), the compiled solver still on the caller's two, and
    the caller's setting back afterwards. Every row: large enough to keep both."""
    import captum_effattn.attr._views as views_module
    import captum_effattn.projection.engine.threads as threads_module
    from captum_effattn.projection.engine.threads import allowed_threads

    model, forward, ids, mask = text_setup("bert")
    # The tiny model's every row is small work too: a threshold between its [CLS] rows and them.
    monkeypatch.setattr(threads_module, "SINGLE_THREAD_WORK", 50_000)
    with capture_attention(model, materialize=False) as record, torch.no_grad():
        forward(ids, mask)
    captured = record.layers
    queries = select_query_rows(query, captured[0].key_mask, captured[0].causal)
    efficient = get_view("efficient")
    seen = []

    def project(*args, **options):
        seen.append((torch.get_num_threads(), allowed_threads()))
        return efficient.project(*args, **options)

    view = View("efficient", project, distribution=True)
    projected = views_module.project_layers(captured, queries, view)
    assert {threads for threads, _ in seen} == {torch_threads}
    assert {allowed for _, allowed in seen} == {2}
    assert torch.get_num_threads() == 2
    for (rows, error), (expected, expected_error) in zip(
        projected, views_module.project_layers(captured, queries, efficient), strict=True
    ):
        torch.testing.assert_close(rows, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(error, expected_error, atol=1e-12, rtol=0)
