"""The benchmark timing harness: paired per-round ratios cancel a machine's drift."""

from __future__ import annotations

import mmap

import pytest

from benchmarks import timing


class FakeClock:
    """A clock that only moves when a fake method says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_paired_ratios_cancel_drift(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    costs = {"forward": 1.0, "attribution": 1.3, "gradient": 2.0}
    calls: list[str] = []
    drift = {"factor": 1.0}

    def method(name: str):
        def run():
            calls.append(name)
            clock.now += costs[name] * drift["factor"]
            if len(calls) % len(costs) == 0:
                drift["factor"] *= 3.0  # the machine slows down between rounds

        return run

    summaries = timing.interleaved({n: method(n) for n in costs}, unit="forward", rounds=5)
    # Every round runs every method once, in a rotated order.
    assert calls[:3] == ["forward", "attribution", "gradient"]
    assert calls[3:6] == ["attribution", "gradient", "forward"]
    assert len(calls) == 3 * 6  # one warm-up round, five measured
    for name, cost in costs.items():
        summary = summaries[name]
        assert summary.rounds == 5
        # Absolute times grew 3**5-fold over the run; the paired ratios did not move.
        assert (summary.low, summary.median, summary.high) == pytest.approx((cost, cost, cost))


def test_ratios_are_paired_round_by_round():
    seconds = [2.0, 4.0, 8.0]
    unit = [1.0, 2.0, 4.0]  # the machine got twice as slow each round
    summary = timing.summarize("method", seconds, unit)
    assert (summary.low, summary.median, summary.high) == (2.0, 2.0, 2.0)
    assert summary.median_seconds == 4.0
    assert summary.cell() == "2.00x [2.00-2.00]"


def test_quartiles_and_bad_input():
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert timing.quartiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError, match="no values"):
        timing.quartiles([])
    with pytest.raises(ValueError, match="unit 'x'"):
        timing.interleaved({"a": lambda: None}, unit="x", rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.interleaved({"a": lambda: None}, unit="a", rounds=0)
    with pytest.raises(ValueError, match="2 times against 1"):
        timing.summarize("m", [1.0, 2.0], [1.0])


def test_machine_line_names_threads_and_load():
    line = timing.machine_line()
    assert "torch threads" in line
    assert "load average" in line


def test_machine_line_states_the_openmp_wait_policy_it_was_given(monkeypatch):
    for name in timing.OPENMP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert "OMP_WAIT_POLICY" not in timing.machine_line()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    assert timing.machine_line().endswith(", OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=1000")


@pytest.mark.skipif(timing.page_faults() is None, reason="no page-fault counts here")
def test_page_faults_count_memory_touched_anew():
    def fresh_pages():
        # A fresh anonymous mapping (not the allocator's, whose reuse depends on its history):
        # every page written is faulted in.
        with mmap.mmap(-1, 8 * 2**20) as pages:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):  # one fault per 4 KB page, not per 2 MB
                pages.madvise(mmap.MADV_NOHUGEPAGE)
            for offset in range(0, len(pages), mmap.PAGESIZE):
                pages[offset] = 1

    summaries = timing.interleaved(
        {"nothing": lambda: None, "fresh": fresh_pages}, unit="nothing", rounds=3
    )
    # Counted for the whole process: an idle thread of another test may fault now and then.
    assert summaries["nothing"].median_faults < 64
    assert summaries["fresh"].median_faults is not None
    assert summaries["fresh"].median_faults >= 8 * 2**20 // mmap.PAGESIZE
