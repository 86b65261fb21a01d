"""The review splits are deterministic, disjoint, balanced and of the documented sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from captum_effattn.data import load_reviews
from captum_effattn.data.splits import (
    LONG_REVIEW_WORDS,
    SplitSizes,
    imdb_heldout,
    rotten_tomatoes_splits,
)

NAMES = ("train", "validation", "test")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def default_splits():
    return rotten_tomatoes_splits()


def _texts(reviews):
    return [review.text for review in reviews]


def test_default_sizes_are_the_documented_ones(default_splits):
    assert {name: len(default_splits[name]) for name in NAMES} == {
        "train": 5000,
        "validation": 1000,
        "test": 1000,
    }


def test_every_split_is_balanced(default_splits):
    for name in NAMES:
        split = default_splits[name]
        assert Counter(review.label for review in split) == {0: len(split) // 2, 1: len(split) // 2}


def test_splits_are_disjoint_and_come_from_rotten_tomatoes(default_splits):
    source = {review.text: review for review in load_reviews("rotten_tomatoes")}
    seen = set()
    for name in NAMES:
        texts = set(_texts(default_splits[name]))
        assert len(texts) == len(default_splits[name]), f"{name} repeats a sentence"
        assert not texts & seen, f"{name} overlaps an earlier split"
        seen |= texts
        assert all(source[review.text] == review for review in default_splits[name])


def test_splits_are_deterministic_and_seeded(default_splits):
    again = rotten_tomatoes_splits()
    other_seed = rotten_tomatoes_splits(seed=1)
    for name in NAMES:
        assert _texts(again[name]) == _texts(default_splits[name])
    assert set(_texts(other_seed.test)) != set(_texts(default_splits.test))


def test_each_split_mixes_the_labels(default_splits):
    # A prefix of a split is roughly balanced: the labels are not sorted.
    prefix = default_splits.test[:100]
    assert 30 <= sum(review.label for review in prefix) <= 70


def test_held_out_splits_do_not_move_when_the_training_set_grows(default_splits):
    bigger = rotten_tomatoes_splits(SplitSizes(train=6000))
    assert _texts(bigger.test) == _texts(default_splits.test)
    assert _texts(bigger.validation) == _texts(default_splits.validation)
    assert set(_texts(default_splits.train)) < set(_texts(bigger.train))
    assert _texts(rotten_tomatoes_splits(SplitSizes(validation=200)).test) == _texts(
        default_splits.test
    )


def test_splits_do_not_depend_on_the_python_hash_seed(default_splits):
    script = (
        "import json\n"
        "from captum_effattn.data.splits import imdb_heldout, rotten_tomatoes_splits\n"
        "s = rotten_tomatoes_splits()\n"
        "print(json.dumps({'test': [r.text for r in s.test[:50]],"
        " 'train': [r.text for r in s.train[:50]],"
        " 'imdb': [r.text[:80] for r in imdb_heldout(10)]}))\n"
    )
    expected = {
        "test": _texts(default_splits.test[:50]),
        "train": _texts(default_splits.train[:50]),
        "imdb": [review.text[:80] for review in imdb_heldout(10)],
    }
    for hash_seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        assert json.loads(out.stdout) == expected, f"PYTHONHASHSEED={hash_seed}"


def test_sizes_that_do_not_fit_are_refused():
    with pytest.raises(
        ValueError, match="needs 4266 sentences per label; Rotten Tomatoes has 4265"
    ):
        rotten_tomatoes_splits(SplitSizes(train=6532))
    with pytest.raises(ValueError, match=r"SplitSizes.validation must be a non-negative even int"):
        SplitSizes(validation=999)
    with pytest.raises(ValueError, match=r"SplitSizes.train must be a non-negative even int"):
        SplitSizes(train=-2)
    with pytest.raises(KeyError, match="split must be one of"):
        rotten_tomatoes_splits(SplitSizes(train=2, validation=2, test=2))["dev"]


def test_imdb_heldout_is_balanced_unique_clean_and_long(minilm_tokenizer):
    reviews = imdb_heldout(200)
    assert len(reviews) == 200
    assert Counter(review.label for review in reviews) == {0: 100, 1: 100}
    assert len({review.text for review in reviews}) == 200
    assert all(review.source == "imdb" for review in reviews)
    assert not any("<br" in review.text.lower() for review in reviews)
    assert all(len(review.text.split()) >= LONG_REVIEW_WORDS for review in reviews)
    # The documented use: truncated to 256 word pieces, every review fills the window.
    lengths = [len(ids) for ids in minilm_tokenizer(_texts(reviews))["input_ids"]]
    assert min(lengths) >= 256


def test_imdb_heldout_is_deterministic_and_seeded():
    assert _texts(imdb_heldout(20)) == _texts(imdb_heldout(20))
    assert set(_texts(imdb_heldout(20, seed=1))) != set(_texts(imdb_heldout(20)))
    # A larger selection extends a smaller one (each label's reviews are taken in a fixed order).
    assert set(_texts(imdb_heldout(20))) < set(_texts(imdb_heldout(40)))
    short = imdb_heldout(20, min_words=0)
    assert min(len(review.text.split()) for review in short) < LONG_REVIEW_WORDS


def test_imdb_heldout_refuses_what_it_cannot_give():
    with pytest.raises(ValueError, match="non-negative even int"):
        imdb_heldout(7)
    with pytest.raises(ValueError, match=r"only .* per label"):
        imdb_heldout(2, min_words=100_000)
