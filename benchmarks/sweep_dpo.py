"""Stage 5 variants compared on what Stage 7 gates: the greedy win rate against the SFT model, plus KL and gap.

    .venv/bin/python benchmarks/sweep_dpo.py name:dpo.key=value,dpo.key=value [name:...]
    # e.g.  base:  rpo:dpo.sft_weight=1.0  rpo_lr:dpo.sft_weight=1.0,dpo.learning_rate=2.5e-5

Needs Stage 3's outputs (`dvc repro gate_init`). Each variant is Stage 5 exactly as `stages/dpo.py` runs it
(dpoflow.training.dpo.train_dpo with params.yaml's dpo section plus the overrides: KL rule and lr back-off included),
then
greedy responses of the policy and of the SFT model, scored by the task verifier. The prompts are the sft_val and
heldout splits, NOT the Stage 7 eval split: choosing params on the prompts that gate the deploy decision would
overstate the win rate. ~15 min per variant on a 2-core CPU. Writes results/dpo_sweep.json (merged by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

import mlx.core as mx  # noqa: E402

from dpoflow.data import judges, tasks  # noqa: E402
from dpoflow.data.formats import read_pairs  # noqa: E402
from dpoflow.eval.measure import kl_prompt_messages  # noqa: E402
from dpoflow.eval.win_rate import pairwise_judgments, responses, win_rate  # noqa: E402
from dpoflow.modeling.loading import load_model
from dpoflow.modeling.policy import load_policy
from dpoflow.modeling.reference import read_ref_logps
from dpoflow.runtime import io
from dpoflow.runtime.params import load_params  # noqa: E402
from dpoflow.training.dpo import train_dpo  # noqa: E402

RESULTS = PROJECT / "benchmarks/results/dpo_sweep.json"


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if not key.startswith("dpo.") or not value:
            raise SystemExit(f"{text!r}: expected name:dpo.key=value[,dpo.key=value]")
        overrides[key[4:]] = value
    return name, overrides


def _typed(current, value: str):
    """`value` as the type of the params field it overrides."""
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, (int, float)):
        return type(current)(float(value))
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    args = ap.parse_args()
    p = load_params(PROJECT / "params.yaml")
    _, batch_size = p.resolved_batch_size()
    heldout_items = tasks.read_split(PROJECT / "data/tasks/heldout.jsonl")
    items = tasks.read_split(PROJECT / "data/tasks/sft_val.jsonl") + heldout_items
    prompts = [tasks.item_prompt(item, p.data.system_prompt or None) for item in items]
    judge = judges.make_judge("verifier")
    pairs = {
        split: read_pairs(PROJECT / f"data/{name}.parquet")
        for split, name in (("train", "pairs"), ("heldout", "heldout_pairs"))
    }
    kl_prompts = kl_prompt_messages(heldout_items, p.init.kl_prompts, p.data.system_prompt)
    sft_model, _ = load_model(PROJECT / "models/sft", dtype=p.model.dtype)
    sft_texts = None  # generated once, with the first policy's tokenizer (the SFT one)
    results = io.read_json(RESULTS) if RESULTS.exists() else {}
    for name, overrides in map(parse_variant, args.variants):
        typed = {k: _typed(getattr(p.dpo, k), v) for k, v in overrides.items()}
        dpo_params = dataclasses.replace(p.dpo, **typed)
        mx.random.seed(p.seed)
        policy = load_policy(PROJECT / "models/sft", PROJECT / "models/policy_init", dtype=p.model.dtype)
        cache = read_ref_logps(
            PROJECT / "data/ref_logps.safetensors",
            pairs,
            max_len=p.preference.max_seq_len,
            reference_hash=policy.reference_hash,
        )
        start = time.perf_counter()
        result = train_dpo(
            policy.model,
            policy.tokenizer,
            pairs["train"],
            cache["train"],
            pairs["heldout"],
            cache["heldout"],
            kl_prompts,
            dpo_params,
            batch_size,
            p.seed,
            None,
            None,
            reference=policy.reference,
            max_len=p.preference.max_seq_len,
            kl_samples=p.init.kl_samples,
            kl_max_tokens=p.init.kl_max_tokens,
        )
        train_seconds = time.perf_counter() - start
        if sft_texts is None:
            sft_texts = responses(
                sft_model, policy.tokenizer, prompts, p.preference.max_tokens, 0.0, p.seed, 64, "SFT greedy"
            )
        policy_texts = responses(
            policy.model, policy.tokenizer, prompts, p.preference.max_tokens, 0.0, p.seed, 64, f"{name} greedy"
        )
        judgments = pairwise_judgments(judge, items, prompts, policy_texts, sft_texts)
        wr = win_rate([j["outcome"] for j in judgments], bootstrap_samples=p.evaluate.bootstrap_samples, seed=p.seed)
        m = result.metrics
        row = {
            "overrides": overrides,
            "kl": m["kl"],
            "kl_target_met": m["kl_target_met"],
            "learning_rate": m["learning_rate"],
            "n_attempts": m["n_attempts"],
            "kl_checks": [{k: e[k] for k in ("step", "kl", "heldout_gap")} for e in m["kl_checks"]],
            "heldout_gap": m["heldout_gap"],
            "heldout_accuracy": m["heldout_accuracy"],
            "win_rate": wr,
            "accuracy_policy": sum(j["score_final"] for j in judgments) / len(judgments),
            "accuracy_sft": sum(j["score_baseline"] for j in judgments) / len(judgments),
            "n_prompts": len(items),
            "train_seconds": round(train_seconds, 1),
        }
        results[name] = row
        print(name, json.dumps(row), flush=True)
        io.write_json(RESULTS, results)


if __name__ == "__main__":
    main()
