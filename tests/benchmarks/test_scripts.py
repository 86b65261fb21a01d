"""Every benchmark script keeps the house rules: a ``--quick`` smoke run, and the machine it ran on
(torch threads, load average) printed next to its numbers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).parents[2] / "benchmarks").glob("bench_*.py"))


def _options(tree: ast.AST) -> set[str]:
    """The option strings of every ``add_argument`` call."""
    return {
        arg.value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "add_argument"
        for arg in call.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
    }


def _names(tree: ast.AST) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | {
        node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
    }


def test_the_benchmarks_are_found():
    assert len(SCRIPTS) >= 8
    assert {"bench_attribution.py", "bench_gpu.py", "bench_memory.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_every_benchmark_has_a_quick_run_and_prints_its_machine(script):
    tree = ast.parse(script.read_text(), filename=str(script))
    assert "--quick" in _options(tree), f"{script.name} has no --quick"
    assert "machine_line" in _names(tree), (
        f"{script.name} does not print torch threads and the load average (machine_line)"
    )
