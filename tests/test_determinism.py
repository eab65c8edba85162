"""Byte-deterministic outputs (issue 21): the same inputs give the same bytes in every file DVC tracks.

A file that differs between two runs on the same inputs changes its md5 in dvc.lock, so `dvc status` marks every
stage that depends on it as changed (`data/ref_logps.safetensors` did: safetensors' own writer puts the metadata in
hash-map order). Checked here:
  - the safetensors writers: dpoflow's own (`io.write_safetensors`, used for the reference log-probs) and MLX's
    (`mx.save_safetensors`: models, LoRA adapters, the reward head): the same arrays in any insertion order, saved
    several times, give identical bytes;
  - e2e: the CI-profile pipeline run twice from scratch (the session pipeline and a fresh project): every output
    dvc.lock records has the same md5 (reports/perf/ excluded: timings); a difference names the file;
  - e2e: `dvc repro -f -s <stage>` on an up-to-date project leaves `dvc status` clean downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from safetensors import safe_open
from tokenizers import Tokenizer

from dpoflow.core.batching import ChosenRejected
from dpoflow.modeling.loading import load_model, save_model, write_model_folder
from dpoflow.modeling.lora import attach_lora, save_adapters
from dpoflow.modeling.reference import read_ref_logps, write_ref_logps
from dpoflow.runtime import io

pytest_plugins = ["tests.fixtures_pipeline"]

TIMING_OUTPUTS = ("reports/perf/",)  # timings, throughput, memory: different on every run by design


def _shuffled(mapping: dict, seed: int) -> dict:
    items = list(mapping.items())
    random.Random(seed).shuffle(items)
    return dict(items)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ writers
ARRAYS = {
    "train/chosen": np.linspace(-3, 1, 7, dtype=np.float32),
    "train/rejected": np.linspace(-4, 0, 7, dtype=np.float32),
    "heldout/chosen": np.arange(3, dtype=np.float64).reshape(3, 1),
    "ids": np.array([[1, 2], [3, 4]], dtype=np.int64),
    "flags": np.array([True, False]),
}
META = {f"key{i}": f"value {i}" for i in range(12)}


def test_write_safetensors_gives_the_same_bytes_for_any_insertion_order(tmp_path):
    outs = []
    for seed in range(6):
        path = tmp_path / f"t{seed}.safetensors"
        io.write_safetensors(path, _shuffled(ARRAYS, seed), metadata=_shuffled(META, seed + 100))
        outs.append(path.read_bytes())
    assert len(set(outs)) == 1, "the same arrays and metadata gave different bytes"
    data = outs[0]
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and list(json.loads(data[8 : 8 + n])) == sorted(["__metadata__", *ARRAYS])
    with safe_open(str(tmp_path / "t0.safetensors"), framework="np") as f:  # the reference reader accepts it
        assert f.metadata() == META and set(f.keys()) == set(ARRAYS)
        for name, array in ARRAYS.items():
            np.testing.assert_array_equal(f.get_tensor(name), array)
            assert f.get_tensor(name).dtype == array.dtype
    floats = {k: v for k, v in ARRAYS.items() if v.dtype == np.float32}
    io.write_safetensors(tmp_path / "f32.safetensors", floats, metadata=META)
    loaded = mx.load(str(tmp_path / "f32.safetensors"))  # and MLX's (which has no float64)
    assert set(loaded) == set(floats)
    np.testing.assert_array_equal(np.array(loaded["train/chosen"]), ARRAYS["train/chosen"])


def test_ref_logps_file_is_byte_deterministic(tmp_path):
    rows = {split: [{"id": f"{split}{i}"} for i in range(n)] for split, n in (("train", 9), ("heldout", 4), ("val", 2))}
    rng = np.random.default_rng(0)
    logps = {s: ChosenRejected(rng.normal(size=len(r)), rng.normal(size=len(r))) for s, r in rows.items()}
    digests = set()
    for seed in range(5):
        path = tmp_path / f"ref{seed}.safetensors"
        write_ref_logps(path, _shuffled(logps, seed), rows, max_len=96, reference_hash="ab" * 32)
        digests.add(_md5(path))
    # and from another process (another hash seed, another allocator state)
    script = (
        "import sys, numpy as np\n"
        "from dpoflow.core.batching import ChosenRejected\n"
        "from dpoflow.modeling.reference import write_ref_logps\n"
        f"rows = {rows!r}\n"
        "rng = np.random.default_rng(0)\n"
        "logps = {s: ChosenRejected(rng.normal(size=len(r)), rng.normal(size=len(r))) for s, r in rows.items()}\n"
        "write_ref_logps(sys.argv[1], logps, rows, max_len=96, reference_hash='ab' * 32)\n"
    )
    other = tmp_path / "other.safetensors"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "PYTHONHASHSEED": "random"}
    subprocess.run([sys.executable, "-c", script, str(other)], check=True, env=env)
    digests.add(_md5(other))
    assert len(digests) == 1, f"the same log-probs gave {len(digests)} different files"
    back = read_ref_logps(other, rows, max_len=96, reference_hash="ab" * 32)
    np.testing.assert_allclose(back["train"].chosen, logps["train"].chosen.astype(np.float32))


def test_mlx_saves_models_adapters_and_heads_byte_deterministically(tmp_path, tiny_model_dir):
    """models/*, adapters and the reward head go through mx.save_safetensors, which sorts its header but lays the
    data out in insertion order: dpoflow's writers sort the arrays first, so any order gives the same bytes."""
    weights = dict(mx.load(str(tiny_model_dir / "model.safetensors")))
    config = io.read_json(tiny_model_dir / "config.json")
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for seed in range(3):
        write_model_folder(tmp_path / f"base{seed}", _shuffled(weights, seed), config, tokenizer, {}, {"seed": 0})
    assert len({_md5(tmp_path / f"base{seed}" / "model.safetensors") for seed in range(3)}) == 1

    model, tokenizer = load_model(tiny_model_dir)
    save_model(model, tokenizer, tmp_path / "m1", config)
    save_model(model, tokenizer, tmp_path / "m2", config)
    attach_lora(model, rank=4, num_layers=2, seed=0)
    save_adapters(model, tmp_path / "a1", {"rank": 4})
    save_adapters(model, tmp_path / "a2", {"rank": 4})
    for a, b in (("m1", "m2"), ("a1", "a2")):
        files = sorted(p.name for p in (tmp_path / a).iterdir())
        assert files == sorted(p.name for p in (tmp_path / b).iterdir())
        differ = [f for f in files if _md5(tmp_path / a / f) != _md5(tmp_path / b / f)]
        assert not differ, f"saving the same model twice gave different {differ}"


# ------------------------------------------------------------------------------------------------ e2e
def locked_outputs(lock: dict) -> dict[str, str]:
    """{output path: md5} of every output dvc.lock records, timings excluded."""
    return {
        out["path"]: out.get("md5") or out.get("hash", "")
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if not out["path"].startswith(TIMING_OUTPUTS)
    }


def file_md5s(project: Path, output: str) -> dict[str, str]:
    root = project / output
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
    return {str(p.relative_to(project)): _md5(p) for p in files}


def differing_files(a: Path, b: Path, outputs: list[str]) -> list[str]:
    out = []
    for output in outputs:
        fa, fb = file_md5s(a, output), file_md5s(b, output)
        out += [f for f in sorted(set(fa) | set(fb)) if fa.get(f) != fb.get(f)] or [f"{output} (the folder's hash)"]
    return out


@pytest.mark.e2e
def test_two_runs_from_scratch_give_identical_outputs(pipeline, tmp_path):
    """The session pipeline and a fresh project from the same commit, both `dvc repro` from scratch: dvc.lock records
    the same md5 for every output (models, data, metrics, gates, reports, plots), timings excluded."""
    from tests.fixtures_pipeline import clone_project, sh

    first = yaml.safe_load(sh(pipeline, "git", "show", "HEAD:dvc.lock").stdout)
    project = clone_project(pipeline, tmp_path / "second", with_outputs=False)  # same commit, no outputs, no cache
    for generated in ("metrics", "gates", "dvclive", "reports"):
        shutil.rmtree(project / generated, ignore_errors=True)
    sh(project, "dvc", "repro")
    second = yaml.safe_load((project / "dvc.lock").read_text())
    a, b = locked_outputs(first), locked_outputs(second)
    assert set(a) == set(b), f"outputs only in one run: {sorted(set(a) ^ set(b))}"
    assert len(a) > 20 and any(p.startswith("models/") for p in a) and "data/ref_logps.safetensors" in a
    differ = sorted(p for p in a if a[p] != b[p])
    assert not differ, "the same inputs gave different bytes in: " + ", ".join(
        differing_files(pipeline, project, differ)
    )


@pytest.mark.e2e
@pytest.mark.parametrize("stage", ["init", "dpo"])
def test_forced_rerun_of_one_stage_leaves_the_pipeline_up_to_date(pipeline, tmp_path, stage):
    """`dvc repro -f -s <stage>` on an up-to-date project rewrites the stage's outputs with the same bytes: dvc.lock
    records the same md5s (timings aside) and nothing downstream is marked changed (init: data/ref_logps.safetensors
    feeds dpo, iterate and evaluate; dpo: its curves feed gate_evaluate). Runs on a clone: the session pipeline is
    not touched."""
    from tests.fixtures_pipeline import clone_project, sh

    project = clone_project(pipeline, tmp_path / "clone")
    assert "up to date" in sh(project, "dvc", "status").stdout
    before = locked_outputs(yaml.safe_load((project / "dvc.lock").read_text()))
    assert f"Running stage '{stage}'" in sh(project, "dvc", "repro", "-f", "-s", stage).stdout
    status = sh(project, "dvc", "status").stdout
    after = locked_outputs(yaml.safe_load((project / "dvc.lock").read_text()))
    differ = sorted(p for p in before if before[p] != after.get(p))
    assert "up to date" in status and not differ, (
        f"after rerunning {stage}:\n{status}\ndifferent bytes in: "
        + ", ".join(differing_files(pipeline, project, differ))
    )
