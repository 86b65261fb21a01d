"""A fine-tune says what it is doing before it starts and shows its progress (issue 18: `make
test` sat silent for twenty minutes while the fixture fine-tuned the classifier)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from captum_effattn.data.classifier import CACHE_ENV, TrainingConfig, load_sentiment_classifier
from captum_effattn.data.splits import SplitSizes

ONE_STEP = TrainingConfig(splits=SplitSizes(train=8, validation=2, test=2), batch_size=8)


@pytest.mark.parametrize("progress", [True, False])
def test_an_empty_cache_announces_the_fine_tune(tmp_path, monkeypatch, capsys, progress):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    classifier = load_sentiment_classifier(config=ONE_STEP, progress=progress)
    err = capsys.readouterr().err
    announcement = next(line for line in err.splitlines() if "Rotten Tomatoes sentences" in line)
    assert announcement.startswith(
        "fine-tuning MiniLM on 8 Rotten Tomatoes sentences, 1 epoch (first use"
    )
    assert f"cached in {classifier.metadata['directory']})" in announcement
    assert classifier.metadata["directory"].startswith(str(tmp_path))
    # The bar (and the accuracy table) only with progress=True.
    assert ("fine-tuning MiniLM: 100%" in err) is progress
    assert ("held-out accuracy" in err) is progress

    load_sentiment_classifier(config=ONE_STEP, progress=progress)  # cached: nothing to say
    assert capsys.readouterr().err == ""


def test_the_session_fixture_shows_the_fine_tune():
    """The shared fixture asks for progress and lets it through pytest's capture."""
    import inspect

    from tests import conftest

    source = inspect.getsource(conftest.sentiment_classifier)
    assert "progress=True" in source
    assert "uncaptured(request)" in source


def test_uncaptured_output_reaches_the_terminal(tmp_path):
    """What the fixture prints inside ``uncaptured`` is on pytest's output, not swallowed."""
    (tmp_path / "test_loud.py").write_text(
        "import sys\n"
        "import pytest\n"
        "from tests.conftest import uncaptured\n\n"
        "@pytest.fixture(scope='session')\n"
        "def loud(request):\n"
        "    with uncaptured(request):\n"
        "        print('fine-tuning, be patient', file=sys.stderr)\n"
        "    print('swallowed', file=sys.stderr)\n\n"
        "def test_loud(loud):\n"
        "    pass\n"
    )
    root = Path(__file__).parents[2]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    output = run.stdout + run.stderr
    assert "fine-tuning, be patient" in output
    assert "swallowed" not in output
