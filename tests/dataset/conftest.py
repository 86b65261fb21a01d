"""A tiny random-weight BERT sequence classifier saved with a WordPiece tokenizer, and inputs."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "great",
    "good",
    "bad",
    "awful",
    "boring",
    "fun",
    "plot",
    "actor",
    "acting",
    "story",
    "and",
    "but",
    "not",
    "very",
    "really",
    "i",
    "liked",
    "hated",
    "it",
    "this",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "negative", 1: "positive"}
TEXTS = [
    "the movie was great",
    "a boring plot and bad acting",
    "i really liked this film but the story was not very good",
    "awful",
    "fun fun fun",
]


def save_tiny_classifier(directory, *, seed: int = 0, id2label=LABELS) -> None:
    """Save a 2-layer BERT classifier (random weights, eager attention) with its tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = SPECIAL + list(WORDS)
    tokenizer = tf.BertTokenizerFast(vocab={token: index for index, token in enumerate(tokens)})
    config = tf.BertConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=40,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = tf.BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-classifier")
    save_tiny_classifier(directory)
    return directory


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("other-classifier")
    save_tiny_classifier(directory, seed=1, id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    return directory


def write_input(path, columns: dict) -> None:
    """Write ``columns`` (name -> list) as CSV, JSON lines or Parquet, by ``path``'s extension."""
    import json

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.suffix == ".jsonl":
        rows = [
            dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.table(columns), path)
    else:
        pq.write_table(pa.table(columns), path)


@pytest.fixture
def reviews_csv(tmp_path):
    """TEXTS with string ids and int labels, as CSV."""
    path = tmp_path / "reviews.csv"
    ids = [f"doc-{index}" for index in range(len(TEXTS))]
    write_input(path, {"doc_id": ids, "review": TEXTS, "gold": [1, 0, 1, 0, 1]})
    return path


def attribute_one(model_dir, text: str, view: str, max_length: int = 40):
    """What EfficientAttentionAttribution gives for ``text`` alone: (tokens, scores, delta)."""
    from captum_effattn import EfficientAttentionAttribution

    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    scores, delta = EfficientAttentionAttribution(forward, model=model).attribute(
        encoded["input_ids"],
        additional_forward_args=(encoded["attention_mask"],),
        view=view,
        return_convergence_delta=True,
    )
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0].tolist())
    return tokens, scores[0].float(), float(delta[0])
