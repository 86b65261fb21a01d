"""A word-level tokenizer built offline for the tiny decoders of :mod:`tests.models.tiny`.

Its 99 ids match their vocabulary and special ids (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2) and add
``<unk>`` 3; every other id is a lower-case word. ``bos=True`` prepends ``<s>`` as Llama's
tokenizer does; GPT-2's adds nothing.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tests.models.tiny import VOCAB

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
_WORDS = (
    "the a an of to in is was and but not it this that he she they we you i "
    "cat dog bird fish tree house car road city river sea sky sun moon star rain snow "
    "red blue green black white big small old new good bad happy sad fast slow "
    "runs walks sees eats likes loves hates finds makes takes gives sings "
    "paris france london england rome italy capital country world day night time year "
    "one two three four five very quite so too always never often "
    "on at by with from up down over under near"
)
WORDS = _WORDS.split(" ")
VOCABULARY = {token: i for i, token in enumerate(SPECIALS + WORDS[: VOCAB - len(SPECIALS)])}
assert len(VOCABULARY) == VOCAB, len(VOCABULARY)


def tiny_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A fast tokenizer over :data:`VOCABULARY` (whitespace and punctuation split)."""
    backend = Tokenizer(models.WordLevel(VOCABULARY, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
