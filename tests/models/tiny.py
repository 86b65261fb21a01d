"""Tiny random-weight Hugging Face models of every supported architecture, and inputs for them.

Reusable by any test: ``tiny_model("gpt2", "eager")`` and ``tiny_inputs("gpt2", padding="left")``.
Weights are seeded (same name, same weights, whatever the attention implementation) and larger
than the default initialisation, so attention is far from uniform and perturbing it shows in the
logits. Every text model has 16-token inputs over 8-wide heads: longer than ``d_head + 1``, so
attention rows are not identifiable and efficient attention moves them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

TINY_MODELS = ("bert", "roberta", "distilbert", "gpt2", "llama", "vit")
"""The first six supported architectures, by ``config.model_type`` (3 layers each)."""

CAUSAL_MODELS = ("gpt2", "llama")

MORE_MODELS = (
    "electra",
    "xlm-roberta",
    "qwen2",
    "gemma",
    "phi3",
    "gpt_neox",
    "albert",
    "mistral",
    "modernbert",
    "t5",
    "bart",
    "mbart",
)
"""The architectures added later (2 layers each), by ``config.model_type``."""

MORE_CAUSAL_MODELS = ("qwen2", "gemma", "phi3", "gpt_neox", "mistral")

WINDOW = 12
"""Sliding window of the windowed tiny models (Mistral, Phi-3, Qwen2's and ModernBERT's local
layers), below the 16-token inputs but above ``d_head + 1``: row ``i`` sees keys ``j`` with
``|i - j| < WINDOW`` (``j <= i`` for decoders), enough keys for efficient rows to move."""

WINDOWED_MODELS = ("qwen2", "phi3", "mistral", "modernbert")

ENCODER_DECODER_MODELS = ("t5", "bart", "mbart")
"""Encoder-decoder models: layers 0-1 are the encoder's, 2-3 the decoder's causal layers."""

NUM_LAYERS, NUM_HEADS, HIDDEN, VOCAB, SEQ_LEN, NUM_LABELS = 3, 4, 32, 99, 16, 3
IMAGE_SIZE, PATCH_SIZE = 32, 8
INIT_STD = 0.2

_COMMON = {"initializer_range": INIT_STD}
MORE_LAYERS = 2
# Shared by the later architectures: hidden 32, 2 layers, 4 heads of width 8, small vocabulary.
_SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "num_hidden_layers": MORE_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "intermediate_size": 37,
    "max_position_embeddings": 64,
    "num_labels": NUM_LABELS,
    **_COMMON,
}
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _seq2seq() -> dict:
    return {
        "vocab_size": VOCAB,
        "d_model": HIDDEN,
        "encoder_layers": MORE_LAYERS,
        "decoder_layers": MORE_LAYERS,
        "encoder_attention_heads": NUM_HEADS,
        "decoder_attention_heads": NUM_HEADS,
        "encoder_ffn_dim": 37,
        "decoder_ffn_dim": 37,
        "max_position_embeddings": 64,
        "num_labels": NUM_LABELS,
        "init_std": INIT_STD,
        "decoder_start_token_id": 2,
        **_TOKENS,
    }


_MORE_CONFIGS: dict[str, Callable[[], tf.PreTrainedConfig]] = {
    "electra": lambda: tf.ElectraConfig(embedding_size=HIDDEN, **_SMALL),
    "xlm-roberta": lambda: tf.XLMRobertaConfig(**_SMALL),
    # Layer 0 global, layer 1 sliding-window attention.
    "qwen2": lambda: tf.Qwen2Config(
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        **_SMALL,
        **_TOKENS,
    ),
    "gemma": lambda: tf.GemmaConfig(num_key_value_heads=1, head_dim=8, **_SMALL, **_TOKENS),
    "phi3": lambda: tf.Phi3Config(
        num_key_value_heads=2, sliding_window=WINDOW, **_SMALL, **_TOKENS
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(**_SMALL, **_TOKENS),
    # One block shared by both layers (ALBERT's default single group of one block).
    "albert": lambda: tf.AlbertConfig(embedding_size=16, **_SMALL),
    "mistral": lambda: tf.MistralConfig(
        num_key_value_heads=2, sliding_window=WINDOW, **_SMALL, **_TOKENS
    ),
    # Layer 0 global, layer 1 local: keys within `local_attention // 2` = WINDOW - 1 positions.
    "modernbert": lambda: tf.ModernBertConfig(
        local_attention=2 * (WINDOW - 1),
        global_attn_every_n_layers=2,
        cls_token_id=1,
        sep_token_id=2,
        **_SMALL,
        **_TOKENS,
    ),
    "t5": lambda: tf.T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // NUM_HEADS,
        num_heads=NUM_HEADS,
        num_layers=MORE_LAYERS,
        d_ff=37,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        num_labels=NUM_LABELS,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
    ),
    "bart": lambda: tf.BartConfig(**_seq2seq()),
    "mbart": lambda: tf.MBartConfig(**_seq2seq()),
}


def _config(name: str) -> tf.PreTrainedConfig:
    if name == "bert":
        return tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=37,
            max_position_embeddings=64,
            num_labels=NUM_LABELS,
            **_COMMON,
        )
    if name == "roberta":
        return tf.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=37,
            max_position_embeddings=64,
            num_labels=NUM_LABELS,
            **_COMMON,
        )
    if name == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=NUM_LAYERS,
            n_heads=NUM_HEADS,
            hidden_dim=37,
            max_position_embeddings=64,
            num_labels=NUM_LABELS,
            **_COMMON,
        )
    if name == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=NUM_LAYERS,
            n_head=NUM_HEADS,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            **_COMMON,
        )
    if name == "llama":
        return tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            num_key_value_heads=2,  # grouped-query attention: 2 query heads per kv head
            intermediate_size=37,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            attention_bias=True,  # values with bias, as the method needs them
            **_COMMON,
        )
    if name == "vit":
        return tf.ViTConfig(
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            intermediate_size=37,
            num_labels=NUM_LABELS,
            **_COMMON,
        )
    if name in _MORE_CONFIGS:
        return _MORE_CONFIGS[name]()
    raise KeyError(f"no tiny model {name!r}; known: {TINY_MODELS + MORE_MODELS}")


_HEAD_CLASSES = {
    "bert": tf.BertForSequenceClassification,
    "roberta": tf.RobertaForSequenceClassification,
    "distilbert": tf.DistilBertForSequenceClassification,
    "gpt2": tf.GPT2LMHeadModel,
    "llama": tf.LlamaForCausalLM,
    "vit": tf.ViTForImageClassification,
    "electra": tf.ElectraForSequenceClassification,
    "xlm-roberta": tf.XLMRobertaForSequenceClassification,
    "qwen2": tf.Qwen2ForCausalLM,
    "gemma": tf.GemmaForCausalLM,
    "phi3": tf.Phi3ForCausalLM,
    "gpt_neox": tf.GPTNeoXForCausalLM,
    "albert": tf.AlbertForSequenceClassification,
    "mistral": tf.MistralForCausalLM,
    "modernbert": tf.ModernBertForSequenceClassification,
    "t5": tf.T5ForSequenceClassification,
    "bart": tf.BartForSequenceClassification,
    "mbart": tf.MBartForSequenceClassification,
}

_BARE_CLASSES = {
    "bert": tf.BertModel,
    "roberta": tf.RobertaModel,
    "distilbert": tf.DistilBertModel,
    "gpt2": tf.GPT2Model,
    "llama": tf.LlamaModel,
    "vit": tf.ViTModel,
    "electra": tf.ElectraModel,
    "xlm-roberta": tf.XLMRobertaModel,
    "qwen2": tf.Qwen2Model,
    "gemma": tf.GemmaModel,
    "phi3": tf.Phi3Model,
    "gpt_neox": tf.GPTNeoXModel,
    "albert": tf.AlbertModel,
    "mistral": tf.MistralModel,
    "modernbert": tf.ModernBertModel,
    "t5": tf.T5Model,
    "bart": tf.BartModel,
    "mbart": tf.MBartModel,
}


def tiny_config(name: str) -> tf.PreTrainedConfig:
    """The config of the tiny ``name`` model (3 layers, or 2 for :data:`MORE_MODELS`; 4 heads of
    width 8)."""
    return _config(name)


def tiny_model(
    name: str, attn_implementation: str = "sdpa", *, head: bool = True, seed: int = 0
) -> tf.PreTrainedModel:
    """A seeded tiny model in evaluation mode.

    Args:
        name: one of :data:`TINY_MODELS`.
        attn_implementation: ``"sdpa"`` (the transformers 5 default) or ``"eager"``.
        head: the model with a task head (sequence classification for encoders, language
            modelling for decoders, image classification for ViT) or the bare model.
        seed: weight seed; equal seeds give equal weights for every implementation.
    """
    classes = _HEAD_CLASSES if head else _BARE_CLASSES
    torch.manual_seed(seed)
    model = classes[name]._from_config(_config(name), attn_implementation=attn_implementation)
    return model.eval()


def tiny_inputs(
    name: str, batch: int = 2, *, padding: str | None = "right", seed: int = 1
) -> dict[str, torch.Tensor]:
    """Forward keyword arguments for the tiny ``name`` model.

    Text: ``input_ids`` ``(batch, 16)`` and ``attention_mask``; with ``padding`` ``"right"`` or
    ``"left"`` the second example has 5 padding tokens on that side (``None``: no padding). ViT:
    ``pixel_values`` ``(batch, 3, 32, 32)`` (17 tokens: [CLS] and 16 patches), no padding.
    """
    generator = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    config = _config(name)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, VOCAB, (batch, SEQ_LEN), generator=generator)
    mask = torch.ones(batch, SEQ_LEN, dtype=torch.long)
    if padding is not None and batch > 1:
        short = slice(SEQ_LEN - 5, None) if padding == "right" else slice(0, 5)
        mask[1, short] = 0
        ids[1, short] = pad
    if name in ENCODER_DECODER_MODELS:
        # Their classifiers read the decoder at each example's (one) end-of-sequence token.
        last = SEQ_LEN - 1 - mask.flip(1).argmax(1)
        ids[torch.arange(batch), last] = config.eos_token_id
    return {"input_ids": ids, "attention_mask": mask}
