"""A tiny random-init llama with a trained byte-level BPE tokenizer: the CI profile's model and the tests'."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dpoflow.modeling.loading import (
    BUILDER_VERSION,
    CHATML_TEMPLATE,
    byte_level_pre_tokenizer,
    chat_tokenizer_config,
    write_model_folder,
)

# Same ids as SmolLM2: 0 = end of text (unk), 1 = <|im_start|> (bos), 2 = <|im_end|> (eos and pad).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ---------------------------------------------------------------------------------------------------------
# Tiny random llama for tests


_TINY_WORDS = [
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "if",
    "then",
    "else",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "has",
    "have",
    "had",
    "do",
    "does",
    "did",
    "not",
    "no",
    "yes",
    "what",
    "which",
    "who",
    "when",
    "where",
    "why",
    "how",
    "answer",
    "question",
    "number",
    "sum",
    "product",
    "difference",
    "total",
    "result",
    "red",
    "blue",
    "yellow",
    "green",
    "color",
    "colors",
    "primary",
    "apple",
    "apples",
    "orange",
    "bird",
    "birds",
    "cat",
    "cats",
    "dog",
    "dogs",
    "legs",
    "count",
    "letter",
    "word",
    "words",
    "sort",
    "sorted",
    "list",
    "first",
    "second",
    "third",
    "last",
    "plus",
    "minus",
    "times",
    "equals",
    "you",
    "I",
    "we",
    "they",
    "he",
    "she",
    "it",
    "model",
    "helpful",
    "assistant",
    "user",
    "system",
    "please",
    "reply",
    "only",
    "final",
]


def _tiny_corpus() -> list[str]:
    """A small deterministic training corpus: words, arithmetic and ChatML-formatted exchanges."""
    lines = [" ".join(_TINY_WORDS[i : i + 12]) for i in range(0, len(_TINY_WORDS), 12)]
    lines += [w.capitalize() + "." for w in _TINY_WORDS]
    lines += [f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}." for a in range(13) for b in range(13)]
    lines += [
        f"<|im_start|>user\nWhat is {a} + {3 * a}?<|im_end|>\n<|im_start|>assistant\n{4 * a}<|im_end|>\n"
        for a in range(20)
    ]
    return lines


def _train_tiny_tokenizer(vocab_target: int) -> Tokenizer:
    """Byte-level BPE (every byte in the alphabet, so any text round-trips) trained on the tiny corpus.

    The trainer stops below `vocab_target` when the corpus runs out of merges; the config uses the
    size actually reached.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(split_digits=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer)
    return tokenizer


def _init_llama_weights(config: dict, seed: int) -> dict[str, mx.array]:
    """HF-style init (normal(0, initializer_range) matrices, unit norms) from a private numpy generator.

    The parameter names and shapes come from mlx-lm's own llama, so the folder always loads; drawing in
    sorted-name order from `default_rng(seed)` makes the bytes a function of the seed alone.
    """
    shapes = dict(tree_flatten(llama.Model(llama.ModelArgs.from_dict(config)).parameters()))
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name].shape
        if len(shape) == 1:
            array = np.ones(shape, dtype=np.float32)
        else:
            array = rng.normal(0.0, config["initializer_range"], size=shape).astype(np.float32)
        weights[name] = mx.array(array)
    return weights


def make_tiny_model(
    out_dir: Path,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_target: int = 512,
    max_position_embeddings: int = 1024,
) -> Path:
    """A random-init float32 llama (SmolLM2's shape in miniature: GQA, tied embeddings, ChatML, same
    special-token ids) with a trained byte-level BPE tokenizer. Builds in well under a second."""
    tokenizer = _train_tiny_tokenizer(vocab_target)
    special_ids = {
        name: tokenizer.token_to_id(token) for name, token in zip(("unk", "bos", "eos"), TINY_SPECIAL_TOKENS)
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": tokenizer.get_vocab_size(),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "pad_token_id": special_ids["eos"],
        "torch_dtype": "float32",
    }
    special = dict(zip(("unk_token", "bos_token", "eos_token"), TINY_SPECIAL_TOKENS), pad_token=TINY_SPECIAL_TOKENS[2])
    tokenizer_config = chat_tokenizer_config(special, CHATML_TEMPLATE, max_position_embeddings, add_bos_token=False)
    source = {
        "builder": "make_tiny_model",
        "version": BUILDER_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_target": vocab_target,
        "max_position_embeddings": max_position_embeddings,
    }
    return write_model_folder(
        Path(out_dir), _init_llama_weights(config, seed), config, tokenizer, tokenizer_config, source
    )
