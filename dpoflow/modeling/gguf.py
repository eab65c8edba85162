"""GGUF -> mlx-lm folder: dequantized weights, the tokenizer and chat template rebuilt from the GGUF metadata
(no torch, no llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models

from dpoflow.modeling.loading import (
    BUILDER_VERSION,
    CHATML_TEMPLATE,
    byte_level_pre_tokenizer,
    chat_tokenizer_config,
    write_model_folder,
)
from dpoflow.runtime.io import file_sha256
from dpoflow.runtime.params import DTYPES

# ---------------------------------------------------------------------------------------------------------
# GGUF -> MLX/HF folder

# llama.cpp tensor names -> mlx-lm llama parameter names.
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp pre-tokenizer names whose regex splits each digit off before the GPT-2 regex (llama-vocab.cpp).
_GGUF_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GGUF_PLAIN_PRE = {"gpt2"}
_GGUF_CONTROL_TOKEN, _GGUF_USER_DEFINED_TOKEN = 3, 4


def _gguf_metadata(reader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def _gguf_float(value: float) -> float:
    """GGUF stores float32; keep the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _llama_config_from_gguf(meta: dict, tensor_names: set[str], dtype: str) -> dict:
    """An HF llama config.json from GGUF metadata.

    `rope_theta` is written at top level because mlx-lm's llama reads only that key; without it the
    model silently runs with theta 10000 and babbles.
    """
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(f"GGUF rope scaling {meta[f'{arch}.rope.scaling.type']!r} is not supported")
    hidden = meta[f"{arch}.embedding_length"]
    heads = meta[f"{arch}.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": _gguf_float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _gguf_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": meta[f"{arch}.context_length"],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"]),
        "torch_dtype": dtype,
    }


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    prefix, layer, kind, leaf = gguf_name.split(".")
    if prefix != "blk" or kind not in _GGUF_BLOCK_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")
    return f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[kind]}.{leaf}"


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp's converter interleaves each head's two rotary halves (rows 0..d/2 and d/2..d become
    0,d/2,1,d/2+1,...) for its interleaved rope kernel; mlx-lm (like HF) rotates halves, so the rows go back.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _llama_weights_from_gguf(reader, config: dict, dtype: str) -> dict[str, mx.array]:
    """Dequantize every tensor with numpy (gguf.quants) and rename it for mlx-lm's llama."""
    from gguf.quants import dequantize

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in heads:
            array = _unpermute_rope(array, heads[kind])
        weights[_hf_tensor_name(tensor.name)] = mx.array(array).astype(getattr(mx, dtype))
    return weights


def _tokenizer_from_gguf(meta: dict) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF vocabulary, merges and token types."""
    model, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre", "gpt2")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in _GGUF_DIGIT_SPLIT_PRE | _GGUF_PLAIN_PRE:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (known: {sorted(_GGUF_DIGIT_SPLIT_PRE | _GGUF_PLAIN_PRE)})"
        )
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(split_digits=pre in _GGUF_DIGIT_SPLIT_PRE)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == _GGUF_USER_DEFINED_TOKEN
        ]
    )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == _GGUF_CONTROL_TOKEN]
    )
    return tokenizer


def _gguf_tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "pad_token": "padding_token_id",
        "unk_token": "unknown_token_id",
    }
    special = {
        name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in ids.items() if f"tokenizer.ggml.{key}" in meta
    }
    return chat_tokenizer_config(
        special,
        chat_template=meta.get("tokenizer.chat_template", CHATML_TEMPLATE),
        model_max_length=meta[f"{meta['general.architecture']}.context_length"],
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def gguf_source(gguf_path: Path, dtype: str) -> dict:
    return {
        "builder": "convert_gguf",
        "version": BUILDER_VERSION,
        "gguf": gguf_path.name,
        "gguf_sha256": file_sha256(gguf_path),
        "dtype": dtype,
    }


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Convert a llama-architecture GGUF (any numpy-dequantizable type, e.g. Q4_1) into an mlx-lm folder.

    Quantized weights are dequantized to `dtype`; the q/k rope permutation llama.cpp applies is undone,
    and the tokenizer and chat template are rebuilt from the GGUF metadata. No torch is needed.
    """
    from gguf import GGUFReader

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    gguf_path = Path(gguf_path)
    reader = GGUFReader(gguf_path)
    meta = _gguf_metadata(reader)
    config = _llama_config_from_gguf(meta, {t.name for t in reader.tensors}, dtype)
    weights = _llama_weights_from_gguf(reader, config, dtype)
    return write_model_folder(
        Path(out_dir),
        weights,
        config,
        _tokenizer_from_gguf(meta),
        _gguf_tokenizer_config(meta),
        gguf_source(gguf_path, dtype),
    )
