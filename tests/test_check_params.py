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


def _files_source(tmp_path, monkeypatch, **fractions):
    """Edit for params_file: data.source files on two small files under tmp_path/inputs (the cwd)."""
    monkeypatch.chdir(tmp_path)
    for kind, name in (("sft", "sft.jsonl"), ("prompts", "prompts.jsonl")):
        (tmp_path / "inputs" / kind).mkdir(parents=True)
        (tmp_path / "inputs" / kind / name).write_text('{"prompt": "q", "completion": "a"}\n')

    def edit(raw):
        raw["data"].update(source="files", sft="inputs/sft/sft.jsonl", prompts="inputs/prompts/prompts.jsonl")
        raw["data"]["fractions"].update(fractions)
        raw["benchmarks"]["tasks"] = ["dpoflow_text_cloze"]

    return edit


@pytest.mark.parametrize("heldout, rounds", [(0.5, 0.5), (0.3, 0.7), (0.4, 0.8)])
def test_split_fractions_that_leave_no_stage_2_prompts_are_refused(tmp_path, monkeypatch, heldout, rounds):
    # before: accepted here, then prepare_data stopped with split_rows' ValueError traceback
    path = params_file(tmp_path, _files_source(tmp_path, monkeypatch, heldout=heldout, rounds=rounds))
    total = f"{round(heldout + rounds, 9):g}"
    message = rf"data\.fractions: heldout \+ rounds = {heldout} \+ {rounds} = {total} leaves no prompts for Stage 2"
    with pytest.raises(ParamsError, match=message):
        check_params(path)


def test_split_fractions_below_one_pass(tmp_path, monkeypatch):
    path = params_file(tmp_path, _files_source(tmp_path, monkeypatch, heldout=0.2, rounds=0.7))
    assert check_params(path).data.fractions.rounds == 0.7


def test_more_kl_prompts_than_embedded_heldout_prompts_are_refused(tmp_path):
    def edit(raw):
        raw["data"]["sizes"]["heldout"] = 20
        raw["init"]["kl_prompts"] = 21

    # before: accepted here, then Stage 3 stopped with a ValueError traceback after SFT and Stage 2 had run
    with pytest.raises(
        ParamsError, match=r"init\.kl_prompts: 21 is more than the 20 held-out prompts of data\.sizes\.heldout"
    ):
        check_params(params_file(tmp_path, edit))
    assert check_params(params_file(tmp_path, _set("init.kl_prompts", 20))).init.kl_prompts == 20


def test_the_checks_name_the_params_file_given(tmp_path):
    path = tmp_path / "exp.yaml"
    params_file(tmp_path, _set("model.base", "inputs/model/missing.gguf")).rename(path)
    with pytest.raises(ParamsError, match=rf"^{path}: model\.base: inputs/model/missing\.gguf does not exist"):
        check_params(path)


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
    # DVC removed the check's marker before the refused run; the check writes the same one again (a second), and
    # since the marker is unchanged nothing after it reruns
    assert ran(sh(pipeline, "dvc", "repro").stdout) == ["check_params"]
