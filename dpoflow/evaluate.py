"""Stage 7 library: capability retention, win rate with a bootstrap interval, human side-by-side evaluation,
contamination audit, the deploy decision and the final model export.

    ret = retention(final_scores, baseline_scores)                     # per benchmark and overall, in %
    judgments = pairwise_judgments(judge, items, prompts, final_texts, baseline_texts)
    wr = win_rate([j["outcome"] for j in judgments], bootstrap_samples=2000, seed=0)
    export_human_sheet(judgments, "reports/human_eval_sheet.csv", "reports/human_eval_key.json", n_rows=50, seed=0)
    import_human_ratings("reports/human_eval_sheet.csv", "reports/human_eval_key.json")   # same win_rate()
    bad = find_contaminated_pairs({"data/pairs.parquet": pairs, ...}, eval_texts)
    decision = deploy_decision(metrics, p, iterate_metrics, baseline)

Definitions (docs/evaluation-monitoring.md, docs/capability-assessment.md):

* Retention of a benchmark = final score / baseline (SFT) score * 100. Baseline 0: counted as 100 when the final
  score is 0 too (nothing to lose, nothing lost); skipped with a note when the final score is above 0 (a gain from
  nothing: no ratio). A benchmark of the baseline the final model was not measured on counts 0 (fail-safe).
  Overall = the mean of the counted benchmarks' retention (100 when none could be counted but some were gains).
* Responses: one per prompt and model, greedy (`temperature` 0) or sampled at `temperature` with the same seed for
  both models. DPO moves the policy's sampling distribution; greedy decoding shows only where its mode flipped.
  The gated win rate uses `evaluate.win_rate_temperature`; the other decoding is measured and reported beside it.
* Outcome of one prompt: 1 = the final model's response is judged better than the baseline's, 0 = worse,
  0.5 = tie (equal judge scores, or identical text). Win rate = mean outcome (ties count half).
* 95% interval: percentile bootstrap over prompts, `bootstrap_samples` resamples from a seeded generator; a
  resample of n outcomes is drawn as multinomial counts of (win, tie, loss), which is the same distribution as
  resampling prompts with replacement and makes the interval independent of the order of the judgments (so the
  human-sheet round trip reproduces it exactly). Alignment improved = the interval's lower bound > 0.5.
"""
from __future__ import annotations

import csv
import math
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dpoflow import io
from dpoflow.training_metrics import DEFAULT_NGRAM, EvalIndex

SHEET_COLUMNS = ("row", "prompt", "response_a", "response_b", "preference", "comment")
KEY_FORMAT = "dpoflow-human-eval-key-v1"
RATINGS = {"a": "a", "b": "b", "tie": "tie", "=": "tie", "equal": "tie", "same": "tie"}
CONFIDENCE = 0.95
OTHER_DECODING_TEMPERATURE = 1.0  # reported-only sampled win rate when the gated one is greedy: the policy itself


# ---------------------------------------------------------------------------------------------------------
# Capability retention


def retention(final: Mapping[str, Optional[float]], baseline: Mapping[str, Optional[float]]) -> dict:
    """Retention (%) per benchmark and overall; see the module docstring for the rules.

    Returns {"retention": overall or None, "retention_per_benchmark": {name: % or None}, "counted": [names],
    "notes": [str], "lowest_benchmark": name or None}."""
    per: dict[str, Optional[float]] = {}
    counted, notes, gains = [], [], 0
    for name in sorted(baseline):
        base = baseline[name]
        value = final.get(name)
        if base is None or not math.isfinite(base):
            per[name] = None
            notes.append(f"{name}: no baseline score: not counted")
            continue
        if value is None or not math.isfinite(value):
            per[name] = 0.0
            counted.append(name)
            notes.append(f"{name}: not measured on the final model: counted as 0 % (fail-safe)")
            continue
        if base == 0:
            if value == 0:
                per[name] = 100.0
                counted.append(name)
                notes.append(f"{name}: baseline and final are both 0: counted as 100 % (nothing lost)")
            else:
                per[name] = None
                gains += 1
                notes.append(f"{name}: baseline 0, final {value:.4g}: a gain from nothing, no ratio: not counted")
            continue
        per[name] = 100.0 * value / base
        counted.append(name)
    for name in sorted(set(final) - set(baseline)):
        notes.append(f"{name}: not in the baseline (metrics/sft.json): not counted")
    if counted:
        overall: Optional[float] = float(np.mean([per[n] for n in counted]))
    elif gains:
        overall = 100.0
        notes.append("no benchmark had a non-zero baseline: overall counted as 100 % (only gains)")
    else:
        overall = None
        notes.append("no benchmark to compare: overall retention undefined (the gate fails)")
    lowest = min(counted, key=lambda n: per[n]) if counted else None
    return {"retention": overall, "retention_per_benchmark": per, "counted": counted, "notes": notes,
            "lowest_benchmark": lowest}


# ---------------------------------------------------------------------------------------------------------
# Win rate


def outcome_of(score_final: float, score_baseline: float, same_text: bool = False) -> float:
    """1.0 final better, 0.0 baseline better, 0.5 tie (equal scores or identical responses)."""
    if same_text or score_final == score_baseline:
        return 0.5
    return 1.0 if score_final > score_baseline else 0.0


def win_rate(outcomes: Sequence[float], bootstrap_samples: int = 2000, seed: int = 0,
             confidence: float = CONFIDENCE) -> dict:
    """Win rate (ties count half) and its percentile-bootstrap interval; see the module docstring.

    Returns {"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "bootstrap_samples", "confidence",
    "seed"}; the rate and bounds are None when there are no outcomes."""
    values = [float(o) for o in outcomes]
    bad = [v for v in values if v not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"outcomes must be 0, 0.5 or 1; got {bad[0]!r}")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    wins, ties = values.count(1.0), values.count(0.5)
    losses = n - wins - ties
    out = {"n": n, "wins": wins, "ties": ties, "losses": losses, "bootstrap_samples": int(bootstrap_samples),
           "confidence": confidence, "seed": int(seed)}
    if n == 0:
        return {**out, "win_rate": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, ties / n, losses / n], size=int(bootstrap_samples))
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(rates, [alpha, 1.0 - alpha])
    return {**out, "win_rate": (wins + 0.5 * ties) / n, "ci_low": float(low), "ci_high": float(high)}


def pairwise_judgments(judge: Any, items: Sequence[Optional[Mapping[str, Any]]], prompts: Sequence[list[dict]],
                       final_texts: Sequence[str], baseline_texts: Sequence[str]) -> list[dict]:
    """Judge the final model's response against the baseline's, prompt by prompt, with the configured judge
    (verifier: tasks.score; reward_model: rewards, compared within the prompt). One dict per prompt:
    {"index", "id", "prompt", "final", "baseline", "score_final", "score_baseline", "outcome"}."""
    if not len(items) == len(prompts) == len(final_texts) == len(baseline_texts):
        raise ValueError("items, prompts, final_texts and baseline_texts must have the same length")
    if not getattr(judge, "generates", True):
        raise ValueError("the win rate needs a scoring judge (verifier or reward_model); the import judge only "
                         "provides labelled pairs: use the human evaluation sheet instead")
    scores = judge.score(list(items), [list(p) for p in prompts],
                         [[f, b] for f, b in zip(final_texts, baseline_texts)]) if prompts else []
    out = []
    for i, (item, prompt, f, b, s) in enumerate(zip(items, prompts, final_texts, baseline_texts, scores)):
        out.append({"index": i, "id": (item or {}).get("id", str(i)), "prompt": list(prompt), "final": f,
                    "baseline": b, "score_final": float(s[0]), "score_baseline": float(s[1]),
                    "outcome": outcome_of(float(s[0]), float(s[1]), f.strip() == b.strip())})
    return out


# ---------------------------------------------------------------------------------------------------------
# Human evaluation: blind side-by-side sheet and its import


def _shown_prompt(prompt: Sequence[Mapping[str, str]]) -> str:
    """What the rater reads: the user turn(s) (the system prompt is the same for every row)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return "\n".join(users) if users else "\n".join(m["content"] for m in prompt)


def export_human_sheet(judgments: Sequence[Mapping[str, Any]], sheet_csv: str | Path, key_json: str | Path,
                       n_rows: int, seed: int = 0, bootstrap_samples: int = 2000,
                       meta: Optional[Mapping[str, Any]] = None) -> dict:
    """Write a blind side-by-side CSV (columns SHEET_COLUMNS; `preference` left blank for A / B / tie) and, separately,
    the key mapping each row's A and B to final / baseline.

    Rows: a seeded sample of min(n_rows, len(judgments)) prompts in a seeded random order; which model is A is a
    seeded coin flip per row. Nothing in the sheet names a model. Returns a summary."""
    rng = random.Random(f"dpoflow-human-eval:{seed}")
    n = min(int(n_rows), len(judgments))
    chosen = rng.sample(range(len(judgments)), n)
    rows, key_rows = [], {}
    for number, index in enumerate(chosen, start=1):
        j = judgments[index]
        final_is_a = rng.random() < 0.5
        a, b = (j["final"], j["baseline"]) if final_is_a else (j["baseline"], j["final"])
        rows.append({"row": str(number), "prompt": _shown_prompt(j["prompt"]), "response_a": a, "response_b": b,
                     "preference": "", "comment": ""})
        key_rows[str(number)] = {"a": "final" if final_is_a else "baseline",
                                 "b": "baseline" if final_is_a else "final",
                                 "index": j.get("index", index), "id": j.get("id")}
    with io.atomic_path(sheet_csv) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(SHEET_COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    io.write_json(key_json, {"format": KEY_FORMAT, "seed": int(seed), "bootstrap_samples": int(bootstrap_samples),
                             "rows": key_rows, **({"meta": dict(meta)} if meta else {})})
    return {"rows": n, "sheet": str(sheet_csv), "key": str(key_json)}


def read_human_ratings(sheet_csv: str | Path, key_json: str | Path) -> tuple[list[float], dict]:
    """(outcomes for the final model, counts) from a filled-in sheet and its key. `preference` per row: A, B or tie
    (also "=", "equal", "same"; case-insensitive); blank = not rated (skipped and counted). Anything else raises
    ValueError naming file:line:preference."""
    key = io.read_json(key_json)
    if key.get("format") != KEY_FORMAT:
        raise ValueError(f"{key_json}: not a dpoflow human-eval key (format {key.get('format')!r})")
    outcomes, unrated, seen = [], 0, set()
    with open(sheet_csv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("row", "preference") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{sheet_csv}:1: header: column {missing[0]!r} missing "
                             f"(expected {', '.join(SHEET_COLUMNS)})")
        for row in reader:
            line = reader.line_num  # the record's last physical line (prompts may span lines)
            number = (row.get("row") or "").strip()
            if number not in key["rows"]:
                raise ValueError(f"{sheet_csv}:{line}: row: {number!r} is not a row of {key_json}")
            if number in seen:
                raise ValueError(f"{sheet_csv}:{line}: row: {number!r} appears twice")
            seen.add(number)
            raw = (row.get("preference") or "").strip()
            if not raw:
                unrated += 1
                continue
            rating = RATINGS.get(raw.lower())
            if rating is None:
                raise ValueError(f"{sheet_csv}:{line}: preference: {raw!r} is not one of A, B, tie (blank = not rated) "
                                 f"[sheet row {number}]")
            if rating == "tie":
                outcomes.append(0.5)
            else:
                outcomes.append(1.0 if key["rows"][number][rating] == "final" else 0.0)
    return outcomes, {"rated": len(outcomes), "unrated": unrated, "rows_in_key": len(key["rows"]),
                      "seed": key.get("seed", 0), "bootstrap_samples": key.get("bootstrap_samples", 2000)}


def import_human_ratings(sheet_csv: str | Path, key_json: str | Path, *, bootstrap_samples: Optional[int] = None,
                         seed: Optional[int] = None) -> dict:
    """Win rate of the final model from human ratings: the same `win_rate` as the automatic path, with the
    bootstrap settings recorded in the key (overridable). Returns win_rate's dict + rated / unrated counts."""
    outcomes, info = read_human_ratings(sheet_csv, key_json)
    result = win_rate(outcomes, bootstrap_samples=info["bootstrap_samples"] if bootstrap_samples is None
                      else bootstrap_samples, seed=info["seed"] if seed is None else seed)
    return {**result, "rated": info["rated"], "unrated": info["unrated"], "source": str(sheet_csv)}


# ---------------------------------------------------------------------------------------------------------
# Contamination audit


def find_contaminated_pairs(pair_sets: Mapping[str, Sequence[Mapping[str, Any]]],
                            eval_texts: Mapping[str, Sequence[str]], ngram: int = DEFAULT_NGRAM) -> list[dict]:
    """Training pairs (by file) whose prompt, chosen or rejected text overlaps an evaluation text (Stage 2's
    decontamination test, training_metrics.EvalIndex).
    One dict per contaminated pair: {"file", "row", "id", "field", "eval_sets"}."""
    index = EvalIndex(eval_texts, ngram)
    found = []
    for file, pairs in pair_sets.items():
        for row, pair in enumerate(pairs, start=1):
            fields = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(pair["prompt"])]
            fields += [("chosen", pair["chosen"]), ("rejected", pair["rejected"])]
            for field_name, text in fields:
                sets = index.hits(text)
                if sets:
                    found.append({"file": file, "row": row, "id": pair.get("id"), "field": field_name,
                                  "eval_sets": sets})
                    break
    return found


# ---------------------------------------------------------------------------------------------------------
# Deploy decision


def round_retention(record: Mapping[str, Any], baseline: Mapping[str, float]) -> Optional[float]:
    bench = record.get("benchmarks")
    return retention(bench, baseline)["retention"] if bench else None


def last_good_round(iterate_metrics: Optional[Mapping[str, Any]], baseline: Mapping[str, float], p: Any) -> dict:
    """The last iterate round that met every Stage 7 threshold measurable per round (retention of its benchmarks,
    KL vs SFT, held-out gap; the win rate is measured only for the final model) and passed Stage 6's checks."""
    rounds = list((iterate_metrics or {}).get("rounds") or [])
    ev = p.evaluate
    for record in reversed(rounds):
        if record["round"] > 0 and (not record.get("passed") or record.get("decision") == "rollback"):
            continue
        ret = round_retention(record, baseline)
        kl, gap = record.get("kl"), record.get("heldout_gap")
        if (ret is not None and ret >= ev.min_retention and kl is not None and kl <= ev.max_kl
                and gap is not None and gap >= ev.min_heldout_gap):
            return {"round": record["round"], "retention": ret, "kl": kl, "heldout_gap": gap,
                    "model": "models/dpo" if record["round"] == 0 else f"round {record['round']} of Stage 6"}
    return {"round": None, "model": "models/sft",
            "note": "no DPO round met every threshold: fall back to the SFT model (models/sft)"}


def deploy_decision(metrics: Mapping[str, Any], p: Any, iterate_metrics: Optional[Mapping[str, Any]] = None,
                    baseline: Optional[Mapping[str, float]] = None) -> dict:
    """reports/deploy.json: deploy = every check of gate `evaluate` passes (gates.gate_checks), with each check and
    its reason; on a capability regression, the rollback the workflow prescribes (the last round that met every
    threshold, a smaller learning rate and more gradual training)."""
    from dpoflow.gates import evaluate_gate

    gate = evaluate_gate("evaluate", dict(metrics), p)
    checks = [{"metric": r.check.metric, "label": r.check.label, "op": r.check.op, "threshold": r.check.threshold,
               "param": r.check.param, "value": r.value, "passed": r.passed,
               "message": r.message()} for r in gate.results]
    failed = {r.check.metric for r in gate.results if not r.passed}
    warnings = []
    per = metrics.get("retention_per_benchmark") or {}
    for name, value in sorted(per.items()):
        if value is not None and value < p.evaluate.min_retention:
            warnings.append(f"{name}: retention {value:.1f} % < {p.evaluate.min_retention:g} % (the overall mean "
                            "is what the gate checks; look at this benchmark before shipping)")
    rollback = None
    if "retention" in failed:
        good = last_good_round(iterate_metrics, baseline or {}, p)
        lr = p.dpo.learning_rate * p.dpo.lr_backoff
        steps = max(1, p.iterate.max_steps // 2)
        rollback = {
            "to": good,
            "parameter_changes": {"dpo.learning_rate": {"from": p.dpo.learning_rate, "to": lr},
                                  "iterate.max_steps": {"from": p.iterate.max_steps, "to": steps}},
            "prescription": (f"capability regression: roll back to {good['model']} (the last round that met every "
                             f"threshold) and retrain more gradually: dpo.learning_rate {p.dpo.learning_rate:g} -> "
                             f"{lr:g} (x dpo.lr_backoff) and iterate.max_steps {p.iterate.max_steps} -> {steps}"),
        }
    deploy = gate.passed
    return {
        "deploy": deploy,
        "model": "models/final",
        "selected_round": metrics.get("selected_round"),
        "checks": checks,
        "reasons": [c["message"] for c in checks],
        "failed": sorted(failed),
        "warnings": warnings,
        "rollback": rollback,
        "note": ("models/final is exported on every run (so it can be inspected, benchmarked or compared); ship it "
                 "only when deploy is true" + ("." if deploy else ": this run must NOT be shipped.")),
    }


# ---------------------------------------------------------------------------------------------------------
# Generation helpers


def responses(model: Any, tokenizer: Any, prompts: Sequence[list[dict]], max_tokens: int, temperature: float = 0.0,
              seed: int = 0, batch_size: int = 64, desc: str = "responses") -> list[str]:
    """One response per prompt: greedy when temperature is 0 (the model's mode), else one sample drawn with `seed`.
    Both are deterministic for the same model, prompts and seed."""
    from dpoflow.generation import generate

    if not prompts:
        return []
    gens = generate(model, tokenizer, [list(p) for p in prompts], n_samples=1, temperature=temperature,
                    max_tokens=max_tokens, seed=seed, batch_size=batch_size, desc=desc)
    return [texts[0] for texts in gens.texts]


def decoding_name(temperature: float) -> str:
    return "greedy" if temperature == 0 else f"sampled (temperature {temperature:g})"


def head_to_head(final_model: Any, sft_model: Any, tokenizer: Any, judge: Any, items: Sequence[Mapping[str, Any]],
                 prompts: Sequence[list[dict]], max_tokens: int, temperature: float, seed: int,
                 bootstrap_samples: int, batch_size: int) -> tuple[dict, list[dict]]:
    """Win rate (with its bootstrap interval) of the final model's responses over the SFT model's, and the
    per-prompt judgments, for one decoding."""
    label = decoding_name(temperature)
    final_texts = responses(final_model, tokenizer, prompts, max_tokens, temperature, seed, batch_size,
                            f"final responses, {label}")
    base_texts = responses(sft_model, tokenizer, prompts, max_tokens, temperature, seed, batch_size,
                           f"SFT responses, {label}")
    judgments = pairwise_judgments(judge, list(items), list(prompts), final_texts, base_texts)
    return win_rate([j["outcome"] for j in judgments], bootstrap_samples=bootstrap_samples, seed=seed), judgments


# ---------------------------------------------------------------------------------------------------------
# Final model export and the stage's measurements


def export_final(sft_dir: str | Path, selected_dir: str | Path, out_dir: str | Path,
                 dtype: Optional[str] = "float32") -> dict:
    """models/final: the selected policy with every adapter fused, as a standalone mlx-lm folder (config, weights,
    tokenizer + chat template) that `mlx_lm.generate --model <out_dir>` and lm-eval (mlx_lm.evaluate.MLXLM) load
    directly; plus export_info.json (selected round, its reference, the SFT hash). Returns export_info."""
    from dpoflow import models
    from dpoflow.iterate import load_selected

    model, tokenizer, selection = load_selected(Path(sft_dir), Path(selected_dir), dtype=dtype, fuse=True)
    with io.atomic_path(out_dir) as tmp:  # the model and export_info.json appear together, or not at all
        models.save_model(model, tokenizer, tmp, io.read_json(Path(sft_dir) / "config.json"))
        info = {"selected_round": selection.get("round"), "reference": selection.get("reference"),
                "iterate_reference": selection.get("iterate_reference"), "sft_hash": selection.get("reference_hash"),
                "finetune": selection.get("finetune"), "model_hash": models.model_hash(tmp)}
        io.write_json(tmp / "export_info.json", info)
    return info


def run_evaluation(*, final_model: Any, sft_model: Any, tokenizer: Any, items: Sequence[Mapping[str, Any]],
                   system_prompt: Optional[str], judge: Any, max_tokens: int, kl_prompts: Sequence[list[dict]],
                   kl_samples: int, kl_max_tokens: int, seed: int, heldout_pairs: Sequence[Mapping[str, Any]],
                   heldout_sft_logps: Mapping[str, np.ndarray], beta: float, length_normalize: bool, max_len: int,
                   batch_size: int, final_benchmarks: Mapping[str, float], baseline_benchmarks: Mapping[str, float],
                   pair_sets: Mapping[str, Sequence[Mapping[str, Any]]], eval_texts: Mapping[str, Sequence[str]],
                   ngram: int = DEFAULT_NGRAM, bootstrap_samples: int = 2000, generation_batch_size: int = 64,
                   judge_name: Optional[str] = None, temperature: float = 0.0) -> tuple[dict, list[dict], dict]:
    """Stage 7's measurements of the final model against the SFT model: (metrics, judgments, perf).

    Retention of `final_benchmarks` vs `baseline_benchmarks`; win rate of responses to `items` (eval prompts)
    judged by `judge`, decoded at `temperature` (gated; judgments returned) and with the other decoding (greedy, or
    sampled at temperature 1 when `temperature` is 0: reported only); KL(final || SFT) with policy.measure_kl on
    `kl_prompts`; the held-out preference gap against Stage 3's SFT log-probs; the contamination audit of
    `pair_sets` against `eval_texts`."""
    import time

    from dpoflow import tasks
    from dpoflow.batching import encode_pair
    from dpoflow.dpo import heldout_metrics
    from dpoflow.policy import measure_kl, pad_id_of

    perf: dict = {}
    t0 = time.perf_counter()
    ret = retention(final_benchmarks, baseline_benchmarks)
    prompts = [tasks.item_prompt(item, system_prompt) for item in items]
    wr, judgments = head_to_head(final_model, sft_model, tokenizer, judge, items, prompts, max_tokens, temperature,
                                 seed, bootstrap_samples, generation_batch_size)
    other_temperature = 0.0 if temperature > 0 else OTHER_DECODING_TEMPERATURE
    wr_other, _ = head_to_head(final_model, sft_model, tokenizer, judge, items, prompts, max_tokens,
                               other_temperature, seed, bootstrap_samples, generation_batch_size)
    t2 = time.perf_counter()
    kl = measure_kl(final_model, tokenizer, kl_prompts, sft_model, seed, kl_samples, kl_max_tokens)
    encoded = [encode_pair(tokenizer, row, max_len) for row in heldout_pairs]
    held = heldout_metrics(final_model, encoded, heldout_sft_logps, beta, length_normalize, pad_id_of(tokenizer),
                           2 * batch_size) if heldout_pairs else {"heldout_gap": None, "heldout_accuracy": None,
                                                                  "heldout_margin": None}
    t3 = time.perf_counter()
    contaminated = find_contaminated_pairs(pair_sets, eval_texts, ngram)
    t4 = time.perf_counter()
    by_file = {name: sum(1 for c in contaminated if c["file"] == name) for name in pair_sets}
    metrics = {
        "retention": ret["retention"],
        "retention_per_benchmark": ret["retention_per_benchmark"],
        "retention_notes": ret["notes"],
        "retention_lowest_benchmark": ret["lowest_benchmark"],
        "benchmarks": dict(final_benchmarks),
        "baseline_benchmarks": dict(baseline_benchmarks),
        "win_rate": wr["win_rate"],
        "win_rate_ci_low": wr["ci_low"],
        "win_rate_ci_high": wr["ci_high"],
        "win_rate_detail": {k: wr[k] for k in ("n", "wins", "ties", "losses", "bootstrap_samples", "confidence",
                                               "seed")} | {"judge": judge_name or getattr(judge, "name", "judge"),
                                                           "max_tokens": max_tokens,
                                                           "decoding": decoding_name(temperature)},
        "win_rate_other_decoding": {"decoding": decoding_name(other_temperature), "win_rate": wr_other["win_rate"],
                                    "ci_low": wr_other["ci_low"], "ci_high": wr_other["ci_high"],
                                    **{k: wr_other[k] for k in ("n", "wins", "ties", "losses")}},
        "kl": kl["kl"], "kl_seq": kl["kl_seq"], "k3": kl["k3"], "kl_n_tokens": kl["n_tokens"],
        **held,
        "contaminated_pairs": len(contaminated),
        "contamination": {"n_pairs_checked": sum(len(v) for v in pair_sets.values()), "by_file": by_file,
                          "ngram": ngram, "eval_sets": {k: len(v) for k, v in sorted(eval_texts.items())},
                          "first": contaminated[:20]},
    }
    perf.update(win_rate_seconds=t2 - t0, kl_and_gap_seconds=t3 - t2,
                contamination_seconds=t4 - t3)
    return _clean_json(metrics), judgments, perf


def _clean_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
