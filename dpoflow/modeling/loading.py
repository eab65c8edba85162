"""Model folders: safe loading and saving, hashing, self-checks and architecture checks.

Every model folder dpoflow writes has one layout, the one `mlx_lm.load` reads offline: `model.safetensors`,
`config.json` (llama), `tokenizer.json`, `tokenizer_config.json` (special tokens and chat template),
`generation_config.json`, and `dpoflow_source.json` (what the folder was built from, so `base.resolve_base` can
reuse it instead of rebuilding).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS
from mlx_lm.utils import save_config as _mlx_save_config
from mlx_lm.utils import save_model as _mlx_save_model
from tokenizers import Tokenizer, pre_tokenizers

from dpoflow.modeling.lora import lora_modules
from dpoflow.runtime.errors import UserError
from dpoflow.runtime.io import atomic_path, file_sha256, read_json, write_json
from dpoflow.runtime.params import DTYPES

# Bump when the bytes a builder writes change, so cached folders are rebuilt.
BUILDER_VERSION = 1
SOURCE_FILE = "dpoflow_source.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")

# Config keys that change the computation; two models agreeing on these can share weights and batches.
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_traditional",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
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

VERIFY_PROMPT = "What are the primary colors?"
ROUND_TRIP_TEXTS = (
    "What are the primary colors?",
    "12 + 345 = 357, and 7 * 8 = 56.",
    "Hello , world! Don't   split\tthese\nlines .",
    "Unicode: café, naïve, 東京, 🙂",
)


class ModelLoadError(UserError, ValueError):
    """A model folder that dpoflow refuses to load, or cannot find."""


class ArchitectureMismatch(UserError, ValueError):
    """Two models (or configs) that should share an architecture do not."""


class ModelVerificationError(UserError, RuntimeError):
    """A converted model that fails its self-check."""


# ---------------------------------------------------------------------------------------------------------
# Folder writing shared by the GGUF converter and the tiny-model builder


def chat_tokenizer_config(
    special: dict[str, str], chat_template: str, model_max_length: int, add_bos_token: bool
) -> dict:
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


def write_model_folder(
    out_dir: Path,
    weights: dict[str, mx.array],
    config: dict,
    tokenizer: Tokenizer,
    tokenizer_config: dict,
    source: dict,
) -> Path:
    """Write the standard folder layout atomically: readers never see a half-written model."""
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        # sorted: MLX lays the data out in insertion order, so the same weights always give the same bytes
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(sorted(weights.items())), metadata={"format": "mlx"})
        write_json(tmp / "config.json", config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_json(tmp / "generation_config.json", generation_config)
        write_json(tmp / SOURCE_FILE, source)
    return Path(out_dir)


def byte_level_pre_tokenizer(split_digits: bool) -> pre_tokenizers.PreTokenizer:
    """GPT-2 byte-level pre-tokenization, optionally one digit per token (SmolLM2 / StarCoder style)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not split_digits:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


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
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": VERIFY_PROMPT}], add_generation_prompt=True, tokenize=True
    )
    greedy = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens)
    return {"round_trip_texts": len(ROUND_TRIP_TEXTS), "prompt": VERIFY_PROMPT, "greedy": greedy}


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
            "model.allow_pickle: true (allow_pickle=True) only if you trust their source."
        )
    raise ModelLoadError(
        f"{folder}: allow_pickle is set, but MLX reads only safetensors and converting {pickles[0]} "
        "needs torch, which dpoflow does not install; convert the weights to safetensors first."
    )


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
                "model.trust_remote_code: true (trust_remote_code=True) only if you trust its source."
            )


def model_folder(path: str | Path) -> Path:
    """A local folder as is; a hub id downloaded (mlx-lm's file patterns) into the HF cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{folder} is a file; expected a model folder (resolve_base converts .gguf files)")
    if _looks_like_path(str(path)):
        raise ModelLoadError(f"model folder not found: {folder}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except OSError as error:  # hub errors (offline, unknown repo, HTTP) are all OSErrors
        reason = " ".join(str(error).split())[:200]
        raise ModelLoadError(
            f"{path!s}: not a local folder, and fetching it from the Hugging Face hub failed ({type(error).__name__}: "
            f"{reason}). Online: check the id. Offline: download it on a machine that is online "
            f"(`huggingface-cli download {path!s} --local-dir inputs/model/<name>`) and point the param at that folder"
        ) from None


def load_model(
    path: str | Path,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    lazy: bool = False,
    dtype: str | None = None,
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a folder or hub id after the safety checks (see ModelLoadError).

    `dtype` (e.g. "float32") casts floating-point parameters after loading.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    folder = model_folder(path)
    _check_weight_format(folder, allow_pickle)
    _check_remote_code(folder, trust_remote_code)
    tokenizer_config = {"trust_remote_code": True} if trust_remote_code else None
    model, tokenizer = mlx_lm.load(
        str(folder), tokenizer_config=tokenizer_config, lazy=lazy, trust_remote_code=trust_remote_code
    )
    if dtype is not None:
        model.set_dtype(getattr(mx, dtype))
    return model, tokenizer


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path, config: dict) -> Path:
    """Save a plain (LoRA-free) model as safetensors + config + tokenizer files, atomically."""
    if lora_modules(model):
        raise ValueError(
            "model still has LoRA layers: call fuse_lora(model) before save_model, "
            "or save_adapters to keep them separate"
        )
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
        digest.update(path.name.encode() + b"\0" + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Architecture checks


def verify_same_architecture(a_model: nn.Module, b_model: nn.Module) -> None:
    """Raise ArchitectureMismatch naming the first difference: parameter names, then shape, then dtype."""
    a, b = dict(tree_flatten(a_model.parameters())), dict(tree_flatten(b_model.parameters()))
    only = sorted((a.keys() - b.keys()) | (b.keys() - a.keys()))
    if only:
        side = "first" if only[0] in a else "second"
        raise ArchitectureMismatch(f"parameter {only[0]!r} exists only in the {side} model ({len(only)} names differ)")
    for name in sorted(a):
        if a[name].shape != b[name].shape:
            raise ArchitectureMismatch(f"parameter {name!r}: shape {tuple(a[name].shape)} != {tuple(b[name].shape)}")
        if a[name].dtype != b[name].dtype:
            raise ArchitectureMismatch(f"parameter {name!r}: dtype {a[name].dtype} != {b[name].dtype}")


def verify_same_config(cfg_a: dict, cfg_b: dict) -> None:
    """Raise ArchitectureMismatch naming the first architecture key (ARCHITECTURE_KEYS) that differs."""
    for key in ARCHITECTURE_KEYS:
        if cfg_a.get(key) != cfg_b.get(key):
            raise ArchitectureMismatch(f"config {key!r}: {cfg_a.get(key)!r} != {cfg_b.get(key)!r}")
