"""A fine-tune says what it is doing before it starts and shows its progress (issue 18: `make
test` sat silent for twenty minutes while the fixture fine-tuned the classifier)."""

from __future__ import annotations

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
    assert announcement.startswith("fine-tuning MiniLM on 8 Rotten Tomatoes sentences (1 epoch;")
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
