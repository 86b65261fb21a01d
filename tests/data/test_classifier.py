"""Fine-tuning, the cache key and the on-disk cache of the sentiment classifier.

A real fine-tune of the offline MiniLM, kept tiny (32 sentences, 12 steps), is built once per
module through the cache and reused by the tests below.
"""

from __future__ import annotations

import dataclasses
import random
import shutil

import pytest
import torch

import captum_effattn.data
from captum_effattn.data.classifier import (
    CACHE_ENV,
    LABELS,
    TrainingConfig,
    classifier_logits,
    evaluate_accuracy,
    library_versions,
    load_sentiment_classifier,
    pretrained_minilm_classifier,
    resolve_cache_dir,
    save_sentiment_classifier,
    sentiment_cache_key,
)
from captum_effattn.data.splits import SplitSizes, rotten_tomatoes_splits

TINY = TrainingConfig(
    splits=SplitSizes(train=32, validation=16, test=16),
    batch_size=8,
    epochs=3,
    learning_rate=2e-4,
    warmup_fraction=0.0,
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def tiny_build(tiny_cache):
    """The tiny classifier as built (in memory), and the random states around the build."""
    torch_state, python_state = torch.random.get_rng_state(), random.getstate()
    built = load_sentiment_classifier(tiny_cache, config=TINY, progress=False)
    rng_after = torch.random.get_rng_state(), random.getstate()
    return built, (torch_state, python_state), rng_after


@pytest.fixture(scope="module")
def tiny_splits():
    return rotten_tomatoes_splits(TINY.splits, seed=TINY.seed)


def _loss(model, tokenizer, reviews):
    logits = classifier_logits(model, tokenizer, [r.text for r in reviews])
    return float(
        torch.nn.functional.cross_entropy(logits, torch.tensor([r.label for r in reviews]))
    )


def test_fine_tuning_lowers_the_training_loss(tiny_build, tiny_splits):
    built, _, _ = tiny_build
    base, tokenizer = pretrained_minilm_classifier(TINY.seed)
    before = _loss(base, tokenizer, tiny_splits.train)
    after = _loss(built.model, built.tokenizer, tiny_splits.train)
    assert after < before - 0.1, (before, after)
    steps = built.metadata["train_losses"]
    assert len(steps) == TINY.epochs * TINY.splits.train // TINY.batch_size


def test_the_built_classifier_is_ready_to_explain(tiny_build):
    built, _, _ = tiny_build
    assert not built.model.training
    assert built.labels == LABELS == ("negative", "positive")
    assert built.model.config.id2label == {0: "negative", 1: "positive"}
    assert next(built.model.parameters()).dtype == torch.float32
    # Transformers' default attention, not a forced eager one: the package captures attention
    # under any implementation.
    base, _ = pretrained_minilm_classifier()
    assert built.model.config._attn_implementation == base.config._attn_implementation


def test_metadata_records_how_it_was_built(tiny_build, tiny_cache):
    built, _, _ = tiny_build
    meta = built.metadata
    assert meta["cache_key"] == sentiment_cache_key(TINY)
    assert meta["config"] == TINY.to_dict()
    assert meta["versions"] == library_versions()
    assert meta["held_out_sizes"] == {"validation": 16, "test": 16}
    for stage in ("before", "after"):
        assert set(meta["accuracy"][stage]) == {"validation", "test"}
        assert all(0 <= acc <= 1 for acc in meta["accuracy"][stage].values())
    assert meta["timings_s"]["fine_tune"] > 0
    assert meta["directory"] == str(tiny_cache / f"sentiment-minilm-{meta['cache_key']}")


def test_accuracy_in_metadata_is_the_measured_accuracy(tiny_build, tiny_splits):
    built, _, _ = tiny_build
    measured = evaluate_accuracy(built.model, built.tokenizer, tiny_splits.validation)
    assert measured == built.metadata["accuracy"]["after"]["validation"]


def test_building_leaves_the_callers_random_state_alone(tiny_build):
    _, (torch_before, python_before), (torch_after, python_after) = tiny_build
    assert torch.equal(torch_before, torch_after)
    assert python_before == python_after


def test_the_cache_round_trips_exactly(tiny_build, tiny_cache, tiny_splits):
    built, _, _ = tiny_build
    loaded = load_sentiment_classifier(tiny_cache, config=TINY, progress=False)
    assert loaded.model is not built.model
    assert loaded.metadata == built.metadata  # read back, not fine-tuned again
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == built.model.config._attn_implementation
    texts = [review.text for review in tiny_splits.test]
    assert torch.equal(
        classifier_logits(loaded.model, loaded.tokenizer, texts),
        classifier_logits(built.model, built.tokenizer, texts),
    )
    entry = tiny_cache / f"sentiment-minilm-{sentiment_cache_key(TINY)}"
    assert sorted(p.name for p in tiny_cache.iterdir()) == [entry.name, f"{entry.name}.lock"]


def test_retraining_is_deterministic_and_replaces_the_entry(
    tiny_build, tiny_cache, tiny_splits, tmp_path
):
    built, _, _ = tiny_build
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    retrained = load_sentiment_classifier(cache, config=TINY, retrain=True, progress=False)
    assert retrained.metadata["created_utc"] >= built.metadata["created_utc"]
    assert retrained.metadata["train_losses"] == built.metadata["train_losses"]
    assert retrained.model is not built.model
    texts = [review.text for review in tiny_splits.test]
    reference = classifier_logits(built.model, built.tokenizer, texts)
    torch.testing.assert_close(
        classifier_logits(retrained.model, retrained.tokenizer, texts), reference
    )
    reloaded = load_sentiment_classifier(cache, config=TINY, progress=False)
    assert (
        reloaded.metadata["timings_s"]
        == retrained.metadata["timings_s"]
        != (built.metadata["timings_s"])
    )
    entry = f"sentiment-minilm-{sentiment_cache_key(TINY)}"
    assert sorted(p.name for p in cache.iterdir()) == [entry, f"{entry}.lock"]


def test_an_interrupted_save_leaves_no_entry(tiny_build, tmp_path):
    built, _, _ = tiny_build
    broken = dataclasses.replace(built, metadata={**built.metadata, "unserialisable": object()})
    target = tmp_path / "entry"
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_sentiment_classifier(broken, target)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_key_changes_with_everything_that_shapes_the_weights():
    variants = {
        "seed": 1,
        "epochs": 2,
        "batch_size": 16,
        "max_length": 128,
        "learning_rate": 5e-5,
        "weight_decay": 0.0,
        "warmup_fraction": 0.0,
        "bf16_autocast": False,
    }
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(variants) | {"splits"} == fields, "a new hyper-parameter needs a variant here"
    base = TrainingConfig()
    configs = [base]
    configs += [dataclasses.replace(base, **{name: value}) for name, value in variants.items()]
    configs += [
        dataclasses.replace(base, splits=dataclasses.replace(base.splits, **{name: 500}))
        for name in ("train", "validation", "test")
    ]
    keys = [sentiment_cache_key(config) for config in configs]
    assert len(set(keys)) == len(keys)
    versions = library_versions()
    version_keys = {
        sentiment_cache_key(base, versions={**versions, name: versions[name] + ".post1"})
        for name in versions
    }
    assert len(version_keys) == len(versions)
    assert keys[0] not in version_keys
    assert sentiment_cache_key(base, versions=versions) == keys[0] == sentiment_cache_key()
    assert len(keys[0]) == 16
    assert int(keys[0], 16) >= 0


def test_the_cache_directory_comes_from_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from-env"))
    assert resolve_cache_dir() == tmp_path / "from-env"
    assert resolve_cache_dir(tmp_path / "from-arg") == tmp_path / "from-arg"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_cache_dir() == tmp_path / ".cache" / "captum_effattn"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "TrainingConfig.epochs must be a positive int"),
        ({"batch_size": 2.5}, "TrainingConfig.batch_size must be a positive int"),
        ({"learning_rate": 0.0}, r"TrainingConfig.learning_rate must be > 0"),
        ({"warmup_fraction": 1.0}, r"TrainingConfig.warmup_fraction must be in \[0, 1\)"),
        ({"splits": SplitSizes(train=16)}, r"training split \(16 sentences\) is smaller"),
    ],
)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**change)


def test_classifier_logits_keep_the_input_order(tiny_build, tiny_splits):
    built, _, _ = tiny_build
    texts = [review.text for review in tiny_splits.validation[:8]]
    together = classifier_logits(built.model, built.tokenizer, texts, batch_size=3)
    one_by_one = torch.cat(
        [classifier_logits(built.model, built.tokenizer, [text]) for text in texts]
    )
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    assert together.shape == (8, 2)
    with pytest.raises(ValueError, match="empty list of texts"):
        classifier_logits(built.model, built.tokenizer, [])


def test_the_data_package_exports_the_classifier_lazily():
    assert captum_effattn.data.load_sentiment_classifier is load_sentiment_classifier
    assert captum_effattn.data.TrainingConfig is TrainingConfig
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        captum_effattn.data.nope  # noqa: B018
