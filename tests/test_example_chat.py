"""The worked example (examples/chat/): the user's own SFT rows, prompts, evaluation prompts and HH-style pairs through
all seven stages on the tiny model, the Stage 4 reward model judging the rounds and the win rate; and DVC tracking
the user's files: editing one makes `dvc status` name exactly the stage that reads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dpoflow.data.formats import load_pairs
from dpoflow.data.sources import load_prompts, load_sft_rows
from tests.pipeline_project import ROOT, make_project, run

pytestmark = pytest.mark.e2e
EXAMPLE = ROOT / "examples" / "chat"
# The CI profile's model and training sizes; the data, benchmarks and judges stay the example's own.
TINY = {
    "model": {
        "base": "tiny",
        "tiny": {"hidden_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 192},
    },
    "sft": {
        "steps": 30,
        "learning_rate": 3.0e-3,
        "finetune": "full",
        "val_every": 30,
        "warmup_steps": 5,
        "max_seq_len": 96,
        "max_val_loss": 8.0,
    },
    "benchmarks": {"limit": 4, "batch_size": 8},
    "preference": {"max_tokens": 6, "max_seq_len": 96, "min_pairs": 10, "min_decontamination": 0.5},
    "init": {"kl_prompts": 4, "kl_max_tokens": 8},
    "reward_model": {
        "learning_rate": 1.0e-3,
        "epochs": 2,
        "lora_layers": 2,
        "min_val_accuracy": 0.0,
        "max_overfit_gap": 1.0,
    },
    "dpo": {
        "learning_rate": 1.0e-4,
        "lora_layers": 2,
        "max_steps": 10,
        "warmup_steps": 2,
        "checkpoint_every": 5,
        "kl_every": 5,
        "min_heldout_gap": -0.5,
    },
    "iterate": {"rounds": 2, "prompts_per_round": 4, "max_steps": 3, "min_pairs": 1},
    "evaluate": {
        "win_rate_prompts": 12,
        "bootstrap_samples": 200,
        "human_eval_sheet": 4,
        "min_retention": 0.0,
        "min_heldout_gap": -0.5,
        "min_win_rate_lower": 0.0,
    },
    "gates": {"bound": ["win_rate"]},  # the tiny model's benchmarks leave no informative task
}


def status(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    out = run(project, "dvc", "status", "--json").stdout
    return set(json.loads(out or "{}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(
        tmp_path_factory.mktemp("chat") / "project", TINY, params=EXAMPLE / "params.yaml", profile=False
    )
    run(project, "dvc", "repro", timeout=3600)
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "example run")
    return project


def test_every_stage_reads_the_users_data(project):
    inputs = project / "examples" / "chat" / "inputs"
    sft = load_sft_rows(inputs / "sft" / "chat.jsonl")
    tasks_dir = project / "data" / "tasks"
    read = lambda name: [json.loads(x) for x in (tasks_dir / f"{name}.jsonl").read_text().splitlines()]  # noqa: E731
    assert {r["id"] for r in read("sft_train") + read("sft_val")} <= {r["id"] for r in sft.rows}
    counts = json.loads((project / "reports" / "prepare_data.json").read_text())
    quarantine = [json.loads(x) for x in (tasks_dir / "quarantine.jsonl").read_text().splitlines()]
    assert counts["sft_rows_in"] == len(sft.rows)  # every row of the user's file is accounted for
    assert len(read("sft_train")) + len(read("sft_val")) + counts["sft_rows_quarantined"] == len(sft.rows)
    assert all(q["reason"].startswith("contaminated") and ":" in q["location"] for q in quarantine)
    evals = load_prompts(inputs / "eval" / "eval_prompts.jsonl")
    assert [r["id"] for r in read("eval")] == [r["id"] for r in evals.rows]
    prompt_ids = {r["id"] for r in load_prompts(inputs / "prompts" / "prompts.jsonl").rows}
    for name in ("pref_prompts", "heldout", "rounds"):
        assert read(name) and {r["id"] for r in read(name)} <= prompt_ids
    # Stage 2: the user's pairs
    pairs = load_pairs(project / "data" / "pairs.parquet", fmt="canonical").pairs
    hh = load_pairs(inputs / "labels" / "preferences_hh.jsonl", fmt="hh").pairs
    assert pairs and {p["chosen"] for p in pairs} <= {p["chosen"] for p in hh}
    # Stage 6 sampled the user's round prompts; Stage 7 judged with the Stage 4 reward model
    rounds = json.loads((project / "reports" / "iterate.json").read_text())
    assert rounds["n_rounds_run"] >= 1
    round_pairs = load_pairs(project / "data" / "rounds" / "round_1.parquet", fmt="canonical").pairs
    round_prompts = {m["content"] for r in read("rounds") for m in r["prompt"]}
    assert all(p["prompt"][-1]["content"] in round_prompts for p in round_pairs)
    assert all(p["source"] == "reward_model" for p in round_pairs)
    ev = json.loads((project / "reports" / "evaluate.json").read_text())
    assert ev["win_rate_detail"]["judge"].startswith("reward_model (Stage 4, held-out accuracy")
    assert ev["win_rate_detail"]["n"] == min(12, len(evals.rows))
    report = (project / "reports" / "report.md").read_text()
    assert "## Data and judges" in report and "examples/chat/inputs/sft/chat.jsonl" in report
    assert "imported from examples/chat/inputs/labels/preferences_hh.jsonl (hh)" in report
    assert re.search(r"Stage 7 win rate judged by reward_model \(Stage 4", report)
    # no arithmetic anywhere: Stage 1 gated on loss alone, benchmarks are the general ones
    gate = json.loads((project / "reports" / "gates" / "sft.json").read_text())
    assert [c["metric"] for c in gate["checks"]] == ["val_loss"]
    assert set(json.loads((project / "reports" / "sft.json").read_text())["benchmarks"]) == {"dpoflow_text_cloze"}


def test_editing_a_users_file_reruns_exactly_its_readers(project):
    assert status(project) == set()
    sft = project / "examples" / "chat" / "inputs" / "sft" / "chat.jsonl"
    labels = project / "examples" / "chat" / "inputs" / "labels" / "preferences_hh.jsonl"
    original = sft.read_text()
    row = {
        "messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]
    }
    sft.write_text(original + json.dumps(row) + "\n")
    assert status(project) == {"prepare_data"}
    sft.write_text(original)
    labels.write_text(labels.read_text() + labels.read_text().splitlines()[0] + "\n")
    assert status(project) == {"preference_data"}


def test_the_example_params_are_the_projects_plus_the_example(project):
    """examples/chat/params.yaml has exactly the keys of params.yaml (the example cannot drift from the project)."""

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("sizes", "tasks", "tiny", "batch_size", "limit", "benchmark_limit"):
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    main = yaml.safe_load((ROOT / "params.yaml").read_text())
    example = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    assert keys(example) == keys(main)
