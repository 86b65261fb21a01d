"""The tweet and planted-token datasets, and task classifiers keyed apart from the sentiment one."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from captum_effattn.data import (
    PLANTED_WORDS,
    TWEET_LABELS,
    SplitSizes,
    load_tweets,
    planted_splits,
    tweet_splits,
)
from captum_effattn.data.planted import plant
from captum_effattn.data.recipe import TrainingConfig, sentiment_cache_key
from captum_effattn.data.tasks import TASKS, get_task


def test_tweets_have_three_classes_and_unique_texts():
    tweets = load_tweets()
    assert len(tweets) > 20_000
    assert set(Counter(t.label for t in tweets)) == {0, 1, 2}
    assert len({t.text for t in tweets}) == len(tweets)
    assert len(TWEET_LABELS) == 3
    assert len(load_tweets(0.9)) < len(tweets)
    with pytest.raises(ValueError, match="min_confidence"):
        load_tweets(1.5)


def test_tweet_splits_are_balanced_disjoint_and_stable():
    splits = tweet_splits(SplitSizes(train=30, validation=6, test=12))
    assert Counter(t.label for t in splits.test) == {0: 4, 1: 4, 2: 4}
    texts = [{t.text for t in splits[name]} for name in ("train", "validation", "test")]
    assert not texts[0] & texts[1]
    assert not texts[0] & texts[2]
    assert not texts[1] & texts[2]
    bigger = tweet_splits(SplitSizes(train=300, validation=6, test=12))
    assert bigger.test == splits.test  # growing train never moves held-out texts


def test_planted_label_is_a_function_of_the_planted_word():
    splits = planted_splits(SplitSizes(train=40, validation=10, test=20))
    for example in [*splits.train, *splits.test]:
        words = example.text.split()
        assert words[example.position] == example.word
        assert example.label == PLANTED_WORDS[example.word]
        assert sum(w in PLANTED_WORDS for w in words) == 1
    assert Counter(e.label for e in splits.test) == {0: 10, 1: 10}


def test_plant_is_deterministic_and_seeded():
    carrier = "the flight leaves at noon from gate twelve"
    assert plant(carrier) == plant(carrier)
    drawn = {(plant(carrier, seed).word, plant(carrier, seed).position) for seed in range(20)}
    assert len(drawn) > 3


def test_task_cache_keys_are_distinct_and_leave_sentiment_alone():
    config = TrainingConfig()
    keys = {task.cache_key(task.default_config) for task in TASKS.values()}
    assert len(keys) == len(TASKS)
    assert sentiment_cache_key(config) not in keys
    tweets = get_task("tweets")
    reseeded = dataclasses.replace(tweets.default_config, seed=1)
    assert tweets.cache_key(reseeded) != tweets.cache_key()
    with pytest.raises(ValueError, match="tweets"):
        get_task("news")
