"""The parameter check before any stage (dpoflow.pipeline.check, stage check_params): the whole file, read as DVC
reads it; unknown and missing keys, bad names and files, and contradictions refused naming the key; and on an
up-to-date pipeline a typo stops `dvc repro` in one line before any work."""

from __future__ import annotations

import pytest
import yaml

from dpoflow.pipeline.check import check_params, missing_keys
from dpoflow.runtime.params import Params, ParamsError, read_params_file
from tests.fixtures_pipeline import ran, sh
from tests.pipeline_project import ROOT

pytest_plugins = ["tests.fixtures_pipeline"]


def params_file(tmp_path, edit=None, text=None):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if edit:
        edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    return path


def test_the_projects_params_and_the_examples_pass_and_set_every_key():
    for path in (ROOT / "params.yaml", ROOT / "examples" / "chat" / "params.yaml"):
        assert missing_keys(Params, read_params_file(path)) == []
    assert check_params(ROOT / "params.yaml").dpo.beta == 0.3


def test_yaml_is_read_as_dvc_reads_it(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("learning_rate: 2.5e-5", "learning_rate: 1e-4")
    assert check_params(params_file(tmp_path, text=text)).dpo.learning_rate == 1e-4  # YAML 1.1 would say "1e-4"


def _set(path, value):
    def edit(raw):
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dpo.bata", 0.2, r"dpo\.bata: unknown key"),
        ("iterate.min_pairs", _DELETE, r"iterate\.min_pairs: missing"),
        ("benchmarks.tasks", ["dpoflow_text_cloze", "no_such_task"], r"benchmarks\.tasks: 'no_such_task' is not"),
        ("model.tiny", {"hiden_size": 8}, r"model\.tiny\.hiden_size: unknown key"),
        ("data.tasks", {"add": {"dataset": "no_such_gen", "weight": 1.0}}, r"data\.tasks: add: unknown reasoning-gym"),
        ("model.base", "inputs/model/missing.gguf", r"model\.base: inputs/model/missing\.gguf does not exist"),
        ("preference.judge", "python:no_module_here:score", r"preference\.judge: .*does not import"),
    ],
)
def test_refused_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ParamsError, match=message):
        check_params(params_file(tmp_path, _set(key, value)))


@pytest.mark.e2e
def test_a_typo_stops_an_up_to_date_pipeline_in_one_line(pipeline):
    params = pipeline / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("dpo:\n", "dpo:\n  bata: 0.2\n", 1))
        proc = sh(pipeline, "dvc", "repro", check=False)
        assert proc.returncode != 0
        assert ran(proc.stdout) == ["check_params"]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
        assert errors == ["Error: params.yaml: dpo.bata: unknown key; allowed keys: " + errors[0].split("keys: ")[1]]
        assert "Traceback" not in proc.stderr
    finally:
        params.write_text(original)
    assert ran(sh(pipeline, "dvc", "repro").stdout) == []  # the params the lock knows: nothing to rerun
