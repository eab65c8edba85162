"""params.yaml validation (dpoflow.runtime.params): a bad value is refused before any work starts, naming the key, the
value and what is allowed; a stage script then exits 1 with that message and writes nothing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpoflow.__main__ import cli
from dpoflow.runtime.params import CHIPS, Params, ParamsError, load_params, parse_params
from tests.pipeline_project import PROFILE, deep_merge

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(path: str, value):
    """params.yaml's content with the dotted key `path` set to `value`."""
    raw = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return raw


def test_the_shipped_params_and_the_ci_profile_are_valid():
    assert isinstance(load_params(ROOT / "params.yaml"), Params)
    p = parse_params(deep_merge(BASE, yaml.safe_load(PROFILE.read_text())))
    assert p.model.base == "tiny" and p.distributed.backend == "auto"


@pytest.mark.parametrize(
    "key, value, message",
    [
        # numeric ranges
        ("dpo.learning_rate", -1e-5, r"dpo\.learning_rate: -1e-05 is not allowed; must be > 0"),
        ("sft.learning_rate", 0, r"sft\.learning_rate: 0\.0 is not allowed; must be > 0"),
        ("dpo.beta", 0, r"dpo\.beta: 0\.0 is not allowed; must be > 0"),
        ("dpo.label_smoothing", 0.7, r"dpo\.label_smoothing: 0\.7 is not allowed; must be >= 0 and <= 0\.5"),
        ("preference.top_p", 0, r"preference\.top_p: 0\.0 is not allowed; must be > 0 and <= 1"),
        ("seed", -1, r"seed: -1 is not allowed; must be >= 0"),
        ("batch_size.cpu", 0, r"batch_size\.cpu: 0 is not allowed; must be >= 1"),
        # choices
        (
            "dpo.loss_type",
            "kto",
            r"dpo\.loss_type: 'kto' is not allowed; allowed values: sigmoid, ipo, hinge, robust, "
            r"conservative",
        ),
        ("chip", "m5_max", r"chip: 'm5_max' is not allowed; allowed values: auto, m4_max, m3_ultra, apple, cpu, cuda"),
        (
            "batch_size.m5_max",
            8,
            r"batch_size\.m5_max: unknown chip; allowed values: m4_max, m3_ultra, apple, cpu, cuda",
        ),
        ("model.dtype", "int8", r"model\.dtype: 'int8' is not allowed; allowed values: float32, bfloat16, float16"),
        (
            "distributed.backend",
            "tcp",
            r"distributed\.backend: 'tcp' is not allowed; allowed values: auto, ring, mpi, "
            r"jaccl, nccl, none",
        ),
        # unknown keys
        ("dpo.betta", 0.1, r"dpo\.betta: unknown key; allowed keys: beta, checkpoint_every, "),
        (
            "trainer",
            {"steps": 1},
            r"trainer: unknown key; allowed keys: batch_size, benchmarks, chip, data, "
            r"distributed, dpo, ",
        ),
        ("data.sizes.test", 5, r"data\.sizes\.test: unknown split; allowed keys: eval, heldout, sft_val, "),
        # wrong types
        ("sft.steps", "100", r"sft\.steps: '100' is not allowed; expected an integer"),
        ("sft.steps", 1.5, r"sft\.steps: 1\.5 is not allowed; expected an integer"),
        ("sft.learning_rate", True, r"sft\.learning_rate: True is not allowed; expected a number"),
        ("sft.learning_rate", float("nan"), r"sft\.learning_rate: nan is not allowed; expected a finite number"),
        ("sft.learning_rate", float("inf"), r"sft\.learning_rate: inf is not allowed; expected a finite number"),
        ("sft.learning_rate", 10**400, r"sft\.learning_rate: 1000.* is not allowed; expected a finite number"),
        ("dpo.length_normalize", "yes", r"dpo\.length_normalize: 'yes' is not allowed; use true or false"),
        ("dpo", [1, 2], r"params\.yaml: dpo: expected a mapping, got list"),
        ("batch_size", [8], r"batch_size: \[8\] is not allowed; expected a mapping"),
        (
            "benchmarks.tasks",
            "dpoflow_task_gen",
            r"benchmarks\.tasks: 'dpoflow_task_gen' is not allowed; expected a list",
        ),
        (
            "benchmarks.tasks",
            ["dpoflow_task_gen", 3],
            r"benchmarks\.tasks\[1\]: 3 is not allowed; expected a task name",
        ),
        ("data.sizes.sft_train", -5, r"data\.sizes\.sft_train: -5 is not allowed; must be >= 0"),
        ("data.system_prompt", 3, r"data\.system_prompt: 3 is not allowed; expected a string"),
        ("model.base", "", r"model\.base: '' is not allowed; expected a model folder"),
        # combinations
        ("preference.judge", "import", r"preference\.import_path: missing; preference\.judge: import needs"),
    ],
)
def test_bad_values_are_refused_naming_key_value_and_what_is_allowed(key, value, message):
    with pytest.raises(
        ParamsError, match=r"^params\.yaml: " + message if not message.startswith("params") else message
    ):
        parse_params(with_value(key, value))


def test_missing_chip_batch_size_and_robust_smoothing_are_refused():
    raw = copy.deepcopy(BASE)
    del raw["batch_size"]["cuda"]
    with pytest.raises(
        ParamsError, match=r"batch_size\.cuda: missing; every chip needs a batch size: " + ", ".join(CHIPS)
    ):
        parse_params(raw)
    raw = with_value("dpo.loss_type", "robust")
    raw["dpo"]["label_smoothing"] = 0.5
    with pytest.raises(ParamsError, match=r"dpo\.label_smoothing: must be < 0\.5 for robust/conservative"):
        parse_params(raw)


def test_the_file_name_replaces_params_yaml_and_broken_files_are_refused(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(with_value("dpo.beta", -1)))
    with pytest.raises(ParamsError, match=rf"^{path}: dpo\.beta: -1\.0 is not allowed"):
        load_params(path)
    path.write_text("dpo: {beta: [unclosed\n")
    with pytest.raises(ParamsError, match=rf"^{path}: not valid YAML"):
        load_params(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match=rf"^{path}: top level: expected a mapping, got list"):
        load_params(path)
    with pytest.raises(ParamsError, match="not found; run from the project root or pass --params"):
        load_params(tmp_path / "missing.yaml")


# every leaf of params.yaml replaced by an arbitrary YAML value: a Params or a ParamsError, never another exception
leaves = [
    f"{section}.{key}" if isinstance(values, dict) else section
    for section, values in BASE.items()
    for key in (values if isinstance(values, dict) else [None])
]
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**400), 10**400), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(leaves), yaml_values)
def test_any_value_anywhere_gives_params_or_a_params_error(key, value):
    try:
        parse_params(with_value(key, value))
    except ParamsError as err:
        assert str(err).startswith(f"params.yaml: {key.split('.')[0]}"), (key, value, str(err))


def test_a_stage_exits_1_with_the_message_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value("dpo.beta", 0)))
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "dpo.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1
    assert "Error: params.yaml: dpo.beta: 0.0 is not allowed; must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_hub_inputs_names_stock_benchmark_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs" / "benchmarks").mkdir(parents=True)
    (tmp_path / "inputs" / "benchmarks" / "mine.yaml").write_text("task: my_quiz\ndataset_path: json\n")
    raw = with_value("benchmarks.tasks", ["dpoflow_text_cloze", "my_quiz"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(cli, ["hub-inputs"]).output == ""  # local and user tasks: offline is fine
    raw["benchmarks"]["tasks"] += ["hellaswag", "mmlu"]
    raw["model"]["base"] = "owner/model"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    # before: only model.base, so `make run` went offline and lm-eval could not fetch the stock tasks' data
    out = CliRunner().invoke(cli, ["hub-inputs"])
    assert out.exit_code == 0
    assert out.output.splitlines() == [
        "model.base: owner/model",
        "benchmarks.tasks: hellaswag",
        "benchmarks.tasks: mmlu",
    ]
