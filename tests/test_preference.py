"""Stage 2: generation -> judging -> pairs -> validation -> regeneration -> outputs, on a tiny random model.

The tiny model writes gibberish, so the verifier would score every response 0: where a test needs pairs, a fake
judge makes the scores deterministic. The verifier itself is checked against the task's checker.
"""

from __future__ import annotations

import json
import math

import pytest

from dpoflow.data import judges, tasks
from dpoflow.data.collect import collect_pairs
from dpoflow.data.decontamination import collect_eval_texts, question_templates, strip_template
from dpoflow.data.formats import read_pairs
from dpoflow.data.pairing import dedupe_responses, make_pairs
from dpoflow.data.validation import validate_dpo_pairs
from dpoflow.eval.gates import evaluate_gate
from dpoflow.pipeline.preference import PreferenceOutputs, write_outputs
from dpoflow.runtime.params import Params, PreferenceParams

PROMPT = [{"role": "user", "content": "Calculate 2 + 3."}]


class FirstWinsJudge(judges.Judge):
    """Scores the first response 1.0 and every other 0.0: a pair whenever a prompt has two distinct responses.
    Prompts whose item id is in `ties` get 0.5 for every response (no pair)."""

    name = "fake"

    def __init__(self, ties=()):
        self.ties = set(ties)
        self.calls = []

    def score(self, items, prompts, responses):
        self.calls.append([len(r) for r in responses])
        return [
            [0.5] * len(rs) if item["id"] in self.ties else [1.0] + [0.0] * (len(rs) - 1)
            for item, rs in zip(items, responses)
        ]


@pytest.fixture(scope="module")
def splits():
    # Enough chain_sum questions (weight 0.2) for template inference (>= 20 per task).
    return tasks.build_splits(
        tasks.TWO_TEMPLATE_SPEC, sizes={"pref_prompts": 40, "heldout": 30, "eval": 60, "sft_val": 30}, seed=0
    )


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from dpoflow.modeling.loading import load_model

    return load_model(tiny_model_dir)


def _config(**kw):
    base = dict(
        samples_per_prompt=4,
        temperature=0.9,
        max_tokens=6,
        max_seq_len=128,
        max_extra_passes=2,
        temperature_step=0.1,
        min_gap=0.15,
        min_pairs=1,
        generation_batch_size=32,
    )
    base.update(kw)
    return PreferenceParams(**base)


def _build(tiny, config, judge, items, heldout=(), eval_texts=None):
    model, tokenizer = tiny
    return collect_pairs(
        config,
        judge,
        seed=0,
        system_prompt=tasks.SYSTEM_PROMPT,
        model=model,
        tokenizer=tokenizer,
        items=items,
        heldout_items=heldout,
        eval_texts=eval_texts,
        items_origin="data/tasks/pref_prompts.jsonl",
        heldout_origin="data/tasks/heldout.jsonl",
    )


def _outputs(root):
    return PreferenceOutputs(
        pairs=root / "data/pairs.parquet",
        pairs_jsonl=root / "data/pairs.jsonl",
        heldout_pairs=root / "data/heldout_pairs.parquet",
        quarantine=root / "data/quarantine.jsonl",
        report=root / "reports/preference_data.md",
        detail=root / "reports/preference_data.json",
        metrics=root / "metrics/preference_data.json",
        perf=root / "reports/perf/preference_data.json",
    )


# --- pairing ----------------------------------------------------------------------------------------------


def test_best_vs_worst_picks_extremes_and_excludes_ties():
    pairs = make_pairs(PROMPT, ["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0], task="t", source="verifier")
    assert len(pairs) == 1
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("b", "c")  # first among equal maxima
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"]) == (1.0, 0.0)
    assert pairs[0]["source"] == "verifier" and pairs[0]["task"] == "t"
    assert make_pairs(PROMPT, ["a", "b", "c"], [0.0, 0.0, 0.0]) == []  # all equal: no pair
    assert make_pairs(PROMPT, ["a"], [1.0]) == []


def test_all_pairs_uses_every_pair_with_different_scores():
    pairs = make_pairs(PROMPT, ["a", "b", "c", "d"], [1.0, 0.0, 1.0, 0.5], pairing="all_pairs")
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("a", "b"), ("a", "d"), ("c", "b"), ("c", "d"), ("d", "b")}  # (a, c) tie excluded
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)


def test_dedupe_responses_before_pairing():
    kept, n_dup, n_empty = dedupe_responses(["17", " 17", "", "18", "17\n", "  "])
    assert kept == ["17", "18"] and n_dup == 2 and n_empty == 2


# --- judges -----------------------------------------------------------------------------------------------


def test_verifier_judge_is_the_task_checker(splits):
    item = splits["pref_prompts"][0]
    judge = judges.make_judge("verifier")
    scores = judge.score(
        [item], [tasks.item_prompt(item)], [[item["answer"], "no idea", "", f"It is {item['answer']}"]]
    )
    assert scores == [[1.0, 0.0, 0.0, 1.0]]


def test_reward_model_judge_centred_sigmoid():
    class FakeRM:
        def score(self, prompts, responses, batch_size):
            assert batch_size == 3 and len(prompts) == len(responses) == 5
            return [float(len(r)) for r in responses]

    judge = judges.make_judge("reward_model", reward_model=FakeRM(), batch_size=3)
    scores = judge.score([None, None], [PROMPT, PROMPT], [["a", "abc", "ab"], ["x", "x"]])
    assert scores[0] == pytest.approx([1 / (1 + math.e), 1 / (1 + math.exp(-1)), 0.5])
    assert scores[1] == [0.5, 0.5]  # equal rewards: a tie, no pair


def test_reward_model_judge_without_model_fails_clearly(tmp_path):
    judge = judges.make_judge("reward_model", reward_model_path=tmp_path / "missing")
    with pytest.raises(judges.JudgeError, match="reward_model"):
        judge.score([None], [PROMPT], [["a", "b"]])


# --- evaluation texts -------------------------------------------------------------------------------------


def test_eval_texts_from_every_set_with_the_right_fields(tmp_path, splits):
    tasks.write_splits({k: splits[k] for k in ("heldout", "eval", "sft_val")}, tmp_path)
    lm = tmp_path / "lm_eval"
    lm.mkdir()
    gen = [
        {
            "id": i["id"],
            "task": i["task"],
            "question": i["question"],
            "prompt": f"{i['question']}\nAnswer with only the final number.",
            "answer": i["answer"],
        }
        for i in splits["eval"]
    ]
    rows = {
        "dpoflow_task_gen": gen,
        "dpoflow_task_mc": [
            {
                "id": "m",
                "task": "basic_arithmetic",
                "question": "Calculate 7 + 8.",
                "choices": ["15", "14", "16", "-15"],
                "gold": 0,
            }
        ],
        "dpoflow_text_cloze": [
            {
                "id": "c",
                "context": "The tub appeared at the door.",
                "choices": ["Of the four projects, the first was good.", "He left."],
                "gold": 0,
            }
        ],
        "dpoflow_humaneval": [
            {
                "task_id": "HumanEval/0",
                "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
                "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                "entry_point": "add",
            }
        ],
    }
    for name, data in rows.items():
        (lm / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    texts = collect_eval_texts(tmp_path, template_items=splits["pref_prompts"])
    assert set(texts) == {
        "heldout",
        "eval",
        "sft_val",
        "lm_eval/dpoflow_task_gen",
        "lm_eval/dpoflow_task_mc",
        "lm_eval/dpoflow_text_cloze",
        "lm_eval/dpoflow_humaneval",
    }
    assert len(texts["heldout"]) == 30 and len(texts["lm_eval/dpoflow_task_gen"]) == len(gen)
    assert texts["lm_eval/dpoflow_task_mc"] == ["7 + 8"]  # question without template; no numeric choices
    assert texts["lm_eval/dpoflow_text_cloze"] == [
        "The tub appeared at the door.",
        "Of the four projects, the first was good.",
    ]  # "He left." < 3 tokens
    assert texts["lm_eval/dpoflow_humaneval"] == [rows["dpoflow_humaneval"][0]["prompt"]]  # not the hidden test
    assert not any("answer with only" in t.lower() for t in texts["lm_eval/dpoflow_task_gen"])
    chain = [i for i in splits["eval"] if i["task"] == "chain_sum"]
    assert chain and all("state the final answer" not in t for t in texts["eval"])


def test_templates_avoid_false_contamination(splits):
    items = [i for s in splits.values() for i in s]
    templates = question_templates(items)
    q_eval = "State the final answer to the following arithmetic problem: 14 + 75 ="
    assert strip_template(q_eval, templates["chain_sum"]) == "14 + 75"
    assert strip_template("Calculate 60 - 62.", templates["basic_arithmetic"]) == "60 - 62"

    def pair(question):
        return make_pairs(tasks.make_prompt(question), ["89", "90"], [1.0, 0.0])[0]

    other = pair("State the final answer to the following arithmetic problem: 3 + 5 =")
    same = pair("Calculate 14 + 75.")  # the eval problem in another task's wording
    kw = dict(min_pairs=1, decontamination_threshold=0.9)
    assert validate_dpo_pairs(pairs=[other], eval_texts={"eval": [q_eval]}, **kw).n_contaminated == 1  # raw: false hit
    stripped = {"eval": [strip_template(q_eval, templates["chain_sum"])]}
    v = validate_dpo_pairs(pairs=[other, same], eval_texts=stripped, **kw)
    assert [c["location"] for c in v.contaminated] == ["<pairs>:2"]


# --- the stage's work on a tiny model ---------------------------------------------------------------------


def test_verifier_end_to_end_scores_are_the_checker(tiny, splits):
    items = splits["pref_prompts"][:4]
    result = _build(tiny, _config(max_extra_passes=0), judges.make_judge("verifier"), items)
    states = [st for st in result.prompt_states if not st.heldout]
    assert len(states) == 4 and all(len(st.raw_texts) == 4 for st in states)
    for st in states:
        assert st.scores == [tasks.score(st.item, r) for r in st.responses]
    m = result.metrics()
    assert m["judge_scores"]["n"] == sum(len(st.responses) for st in states)
    assert m["n_input"] == m["n_pairs"] + m["n_quarantined"]


def test_pairs_are_best_vs_worst_and_ties_are_excluded(tiny, splits):
    items = splits["pref_prompts"][:6]
    ties = {items[0]["id"], items[3]["id"]}
    result = _build(tiny, _config(max_extra_passes=0), FirstWinsJudge(ties), items)
    by_item = {st.item["id"]: st for st in result.prompt_states}
    assert by_item[items[0]["id"]].pairs == [] and by_item[items[3]["id"]].pairs == []
    for item in (items[1], items[2], items[4], items[5]):
        st = by_item[item["id"]]
        assert len(st.pairs) == 1
        assert st.pairs[0]["chosen"] == st.responses[0] and st.pairs[0]["rejected"] == st.responses[1]
    m = result.metrics()
    assert m["n_prompts"] == 6 and m["n_prompts_with_pair"] == 4 and m["avg_gap"] == 1.0
    assert m["passes"] == 1 and m["temperature_final"] == 0.9


def test_regeneration_on_weak_data_records_passes_and_gate_fails(tiny, splits):
    items = splits["pref_prompts"][:6]
    ties = {items[0]["id"], items[1]["id"]}
    judge = FirstWinsJudge(ties)
    result = _build(tiny, _config(min_pairs=50), judge, items)  # 4 pairs < 50: weak, regenerate
    m = result.metrics()
    log = [m["pass_log"][str(k)] for k in range(m["passes"])]
    assert m["passes"] == 3
    assert [p["temperature"] for p in log] == [0.9, 1.0, 1.1] and m["temperature_final"] == 1.1
    assert [p["seed"] for p in log] == [0, 1, 2]
    assert [p["prompts"] for p in log] == [6, 2, 2]  # only prompts without a pair are sampled again
    assert [p["pairs"] for p in log] == [4, 4, 4]
    tied = [st for st in result.prompt_states if st.item["id"] in ties]
    assert all(len(st.raw_texts) == 12 and st.passes == [0, 1, 2] for st in tied)  # responses pooled over passes
    assert len(judge.calls[1]) == 2 and all(n > 4 for n in judge.calls[1])  # pooled, re-judged together

    gate = evaluate_gate("preference_data", m, Params())
    assert not gate.passed
    report = gate.report()
    assert "pairs 4 < 1000 (preference.min_pairs): FAILED" in report
    assert "preference gap 1 >= 0.15" in report and "decontamination 1 >= 0.9" in report


def test_reference_answer_is_chosen_only_when_no_sample_is_right(splits):
    from dpoflow.data.pairing import PromptState, make_pairs, reference_pairs

    verifier = judges.make_judge("verifier")
    items = [it for it in splits["pref_prompts"] if it["task"] == "basic_arithmetic"][:3]
    right = [tasks.sft_target(it) for it in items]
    wrong = [f"{int(it['answer']) + 1}" for it in items]
    cases = [
        [wrong[0], wrong[0] + "0"],  # all wrong: the reference is chosen against the first worst
        [right[1], wrong[1]],  # mixed: the on-policy pair stays
        [right[2], right[2] + " "],
    ]  # all right: nothing to prefer
    states = []
    for item, responses in zip(items, cases):
        st = PromptState(item=item, prompt=tasks.item_prompt(item), location="x")
        st.responses = responses
        st.scores = verifier.score([item], [st.prompt], [responses])[0]
        st.pairs = make_pairs(st.prompt, st.responses, st.scores, task=item["task"], source="verifier")
        states.append(st)
    assert reference_pairs(states, verifier, "verifier") == [0]
    pair = states[0].pairs[0]
    assert (pair["chosen"], pair["rejected"], pair["source"]) == (right[0], wrong[0], "verifier+reference")
    assert (pair["score_chosen"], pair["score_rejected"]) == (1.0, 0.0)
    assert states[1].pairs[0]["source"] == "verifier" and states[2].pairs == []
    assert [st.pairs[0]["source"] for st in states[:2]] == ["verifier+reference", "verifier"]


class CentredLengthJudge(judges.Judge):
    """Scores like the reward-model judge, centred on the prompt's responses: sigmoid(len - mean len)."""

    name = "centred"

    def __init__(self):
        self.calls = []

    def score(self, items, prompts, responses):
        self.calls.append([list(r) for r in responses])
        return [[1 / (1 + math.exp(-(len(t) - sum(map(len, rs)) / len(rs)))) for t in rs] for rs in responses]


def test_reference_is_judged_on_the_responses_scale(splits):
    """A centring judge rates a lone text 0.5 whatever it is: the reference is judged in one list with the responses."""
    from dpoflow.data.pairing import PromptState, reference_pairs

    item = splits["pref_prompts"][0]
    reference = tasks.sft_target(item)
    st = PromptState(item=item, prompt=tasks.item_prompt(item), location="x")
    st.responses, st.scores = ["1", "22"], [0.5, 0.5]  # a centring judge's tie: no on-policy pair
    judge = CentredLengthJudge()
    assert reference_pairs([st], judge, "centred") == [0]
    assert judge.calls == [[["1", "22", reference]]]
    pair = st.pairs[0]
    assert (pair["chosen"], pair["rejected"]) == (reference, "1") and pair["score_chosen"] > 0.5 > pair[
        "score_rejected"
    ]


def test_reference_chosen_turns_a_wrong_model_into_pairs(tiny, splits):
    items = splits["pref_prompts"][:6]
    off = _build(tiny, _config(max_extra_passes=0), judges.make_judge("verifier"), items)
    on = _build(
        tiny,
        _config(max_extra_passes=0, reference_chosen=True),
        judges.make_judge("verifier"),
        items,
        heldout=splits["heldout"][:3],
    )
    assert off.metrics()["n_pairs"] == 0  # a random model never answers right: no pair without references
    m = on.metrics()
    assert m["n_pairs"] == m["n_reference_pairs"] == 6 and m["avg_gap"] == 1.0
    by_id = {st.item["id"]: st for st in on.prompt_states}
    for pair, item in zip(on.pairs, items):
        assert pair["chosen"] == tasks.sft_target(item) and pair["rejected"] in by_id[item["id"]].responses
    assert len(on.heldout_pairs) == 3 and all(p["source"] == "verifier+reference" for p in on.heldout_pairs)


def test_no_regeneration_when_the_data_is_good(tiny, splits):
    result = _build(
        tiny, _config(min_pairs=3), FirstWinsJudge({splits["pref_prompts"][0]["id"]}), splits["pref_prompts"][:4]
    )
    assert result.metrics()["passes"] == 1


def test_outputs_heldout_pairs_and_quarantine_reasons(tiny, splits, tmp_path):
    items, heldout = splits["pref_prompts"][:5], splits["heldout"][:3]
    # Make one prompt "contaminated" (a basic_arithmetic one: a raw chain_sum question would hit every chain_sum
    # prompt through its template, see test_templates_avoid_false_contamination).
    target = next(i for i, item in enumerate(items) if item["task"] == "basic_arithmetic")
    eval_texts = {"eval": [items[target]["question"]]}
    result = _build(tiny, _config(), FirstWinsJudge(), items, heldout, eval_texts)
    paths = _outputs(tmp_path)
    write_outputs(result, paths, metric_keys=("n_pairs", "avg_gap", "decontamination"), perf_extra={})
    assert json.loads(paths.metrics.read_text()) == {"n_pairs": 4, "avg_gap": 1.0, "decontamination": 0.8}
    m = json.loads(paths.detail.read_text())
    assert m["n_pairs"] == 4 and m["n_contaminated"] == 1 and m["decontamination"] == pytest.approx(0.8)
    assert m["heldout_pairs"] == 3 and m["heldout_prompts"] == 3
    assert len(read_pairs(paths.pairs)) == 4 and len(read_pairs(paths.pairs_jsonl)) == 4
    held = read_pairs(paths.heldout_pairs)
    assert {p["prompt"][-1]["content"].split("\n")[0] for p in held} == {i["question"] for i in heldout}
    rows = [json.loads(line) for line in paths.quarantine.read_text().splitlines()]
    assert [(r["location"], r["reason"]) for r in rows] == [
        (f"data/tasks/pref_prompts.jsonl:{target + 1}", "contaminated: eval")
    ]
    assert rows[0]["field"].startswith("prompt") and rows[0]["row"]["id"]
    assert m["quarantine_reasons"] == {"contaminated": 1}
    report = paths.report.read_text()
    for heading in ("Preference gap", "Judge score distribution", "Lengths", "Quarantine", "Decontamination"):
        assert heading in report
    perf = json.loads(paths.perf.read_text())
    assert perf["generated_tokens"] > 0 and perf["tokens_per_sec"] > 0

    # Over-long pairs (prompt ids + response ids + eos > max_seq_len) are quarantined with their reason.
    short = _build(tiny, _config(max_seq_len=40, max_extra_passes=0), FirstWinsJudge(), items, heldout)
    write_outputs(short, _outputs(tmp_path), metric_keys=(), perf_extra={})
    rows = [json.loads(line) for line in paths.quarantine.read_text().splitlines()]
    assert len(rows) == 5 + 3 and all(r["reason"].startswith("over-long") for r in rows)
    assert {r["location"].rsplit(":", 1)[0] for r in rows} == {
        "data/tasks/pref_prompts.jsonl",
        "data/tasks/heldout.jsonl",
    }
    assert short.metrics()["n_overlong"] == 5 and short.metrics()["heldout_quarantined"] == 3


def test_same_seed_same_metrics(tiny, splits):
    items = splits["pref_prompts"][:4]
    a = _build(tiny, _config(min_pairs=10), FirstWinsJudge({items[0]["id"]}), items, splits["heldout"][:2])
    b = _build(tiny, _config(min_pairs=10), FirstWinsJudge({items[0]["id"]}), items, splits["heldout"][:2])
    assert json.dumps(a.metrics(), sort_keys=True) == json.dumps(b.metrics(), sort_keys=True)
    assert [p["id"] for p in a.pairs] == [p["id"] for p in b.pairs]


# --- judge import -----------------------------------------------------------------------------------------


def test_import_judge_trl_file(tiny, tmp_path):
    _, tokenizer = tiny
    rows = []
    for i in range(20):
        rows.append(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                    "chosen": [{"role": "assistant", "content": str(2 * i)}],
                    "rejected": [{"role": "assistant", "content": str(2 * i + 1)}],
                }
            )
        )
    rows.append(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "Same?"}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "yes"}],
            }
        )
    )
    rows.append("{not json")
    path = tmp_path / "trl.jsonl"
    path.write_text("\n".join(rows) + "\n")
    config = _config(import_heldout_fraction=0.25, min_pairs=1)
    judge = judges.make_judge("import", import_path=str(path))
    assert not judge.generates
    result = collect_pairs(
        config, judge, seed=0, system_prompt=None, tokenizer=tokenizer, eval_texts={"eval": ["What is 3 plus 3?"]}
    )
    m = result.metrics()
    assert m["judge"] == "import" and m["passes"] == 0
    assert m["n_input"] == m["n_pairs"] + m["n_quarantined"]
    assert m["n_input"] + m["heldout_input"] == 22
    assert 0 < m["heldout_pairs"] < 20 and m["n_pairs"] + m["heldout_pairs"] <= 20
    reasons = m["quarantine_reasons"]
    assert reasons["broken JSON"] == 1 and reasons["chosen == rejected"] == 1
    assert all(p["source"].startswith(f"import:{path}:") for p in result.pairs)
    assert all(p["score_chosen"] is None for p in result.pairs) and m["avg_gap"] == 1.0  # label-only
    paths = _outputs(tmp_path / "out")
    write_outputs(result, paths, metric_keys=(), perf_extra={})
    assert len(read_pairs(paths.pairs)) == m["n_pairs"]
    assert len(read_pairs(paths.heldout_pairs)) == m["heldout_pairs"]
    located = [json.loads(line)["location"] for line in paths.quarantine.read_text().splitlines()]
    assert f"{path}:22" in located and f"{path}:21" in located
