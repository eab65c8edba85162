"""Stage 6: iterative (on-policy) DPO rounds, compared round by round, with rollback and convergence.

Round 0 is the Stage 5 policy. Round k = 1 .. iterate.rounds:

    prompts = screened[(k-1)*P : k*P]                             P = iterate.prompts_per_round (disjoint rounds)
              screened: the round prompts without those that overlap an evaluation set (set aside with their reason
              before any sampling: decontamination.screen_prompts)
    pairs   = collect_pairs(policy_{k-1}, judge, prompts)          on-policy samples, judged, validated by Stage 2's
              validator; the round FAILS if they fail Stage 2's gate, with n_pairs compared to iterate.min_pairs
    ref     = iterate.reference: initial  -> the SFT model (LoRA disabled)
                                 previous -> policy_{k-1} (its adapters fused into the weights, fresh LoRA on top)
    reference log-probs of the round's pairs under `ref`; then train_dpo (KL rule included: the KL there is against
    the round's reference) for iterate.max_steps steps (capped at iterate.max_epochs passes over the round's pairs),
    starting from policy_{k-1}.

After every round (and for round 0) the SAME measurements, always against the SFT model so rounds compare:
eval.measure.measure_policy (KL, held-out gap, greedy task accuracy) and the capability benchmarks on a fused copy.
eval.rounds decides: continue, roll back (and stop) or stop as converged, and selects the best eligible round. A
round's policy is a chain of snapshots on the SFT weights (modeling.chain). Each round's state is written when it
ends, so a killed run resumes at the first round not finished.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn
import numpy as np

from dpoflow.data.collect import collect_pairs
from dpoflow.data.decontamination import screen_prompts
from dpoflow.data.formats import read_pairs
from dpoflow.data.judges import Judge
from dpoflow.data.pairs import write_pairs
from dpoflow.eval.gates import pair_gate
from dpoflow.eval.measure import Probe, measure_policy
from dpoflow.eval.rounds import (
    PRIMARY,
    WATCHED,
    convergence_analysis,
    decide_round,
    finite,
    overall_decision,
    round_dpo_params,
    round_min_pairs,
    round_slice,
    round_steps,
    select_round,
)
from dpoflow.modeling import loading
from dpoflow.modeling.chain import (
    chain_for,
    export_fused,
    finetune_of,
    load_chain,
    round_policy,
    save_snapshot,
)
from dpoflow.modeling.reference import compute_ref_logps
from dpoflow.runtime import io
from dpoflow.runtime.params import Params
from dpoflow.training.dpo import train_dpo
from dpoflow.training.trainer import TrainingDiverged

STATE_FILE = "round.json"
ROUND_SEED_STRIDE = 1000  # round k samples with seed + k * stride (Stage 2's passes use seed + pass)


@dataclass
class Rounds:
    """What every round shares: the params, the models, the judge, the measurement and where state goes."""

    params: Params
    batch_size: int
    sft_dir: Path
    sft_model: nn.Module  # the SFT model: KL reference of every measurement
    judge: Judge
    probe: Probe  # the measurement of every round (against SFT)
    heldout_pairs: Sequence[Mapping[str, Any]]  # the pairs behind probe.heldout (their log-probs per reference)
    eval_texts: dict[str, list[str]] | None
    work_dir: Path  # round states, pairs, snapshots, DPO checkpoints, the fused copy
    benchmark_fn: Callable[[Path], Mapping[str, float]] | None = None  # fused model dir -> {task: score}
    fingerprint: str = ""
    log: Callable[[str], None] = lambda message: None
    # Round k's prompts: (k, screened [(line, item)], chains, records so far) -> [(line, item)], called for every
    # round in order (resumed ones too). None = the fixed slice (round_slice). E.g. eval.weakness.TargetedPrompts;
    # put what it depends on into `fingerprint`.
    choose_prompts: Callable[..., Sequence[tuple[int, Mapping[str, Any]]]] | None = None
    # A policy's per-category results, (model, tokenizer) -> eval.weakness.breakdown, kept in each round's record
    # as "categories" (what choose_prompts targets and the report compares). None = not measured.
    categorize: Callable[[nn.Module, Any], Mapping[str, Any]] | None = None

    @property
    def min_pairs(self) -> int:
        it, sizes = self.params.iterate, self.params.data.sizes or {}
        return round_min_pairs(
            it.min_pairs, self.params.preference.min_pairs, it.prompts_per_round, sizes.get("pref_prompts")
        )

    @property
    def system_prompt(self) -> str | None:
        return self.params.data.system_prompt or None


@dataclass
class RoundOutcome:
    """One round, as it ended: its record (deterministic), its pairs and quarantine rows, its policy chain (None
    when it trained nothing) and timings."""

    record: dict
    pairs: list[dict]
    quarantined: list[dict]
    chain: list[Path] | None
    timings: dict = field(default_factory=dict)


@dataclass
class IterateResult:
    rounds: list[dict]  # one record per round, round 0 first (deterministic)
    selected_round: int
    decision: str  # overall_decision
    analysis: str
    chains: dict[int, list[Path]]  # round -> snapshot chain (round 0: the Stage 5 policy)
    pairs: dict[int, list[dict]]  # round -> its validated on-policy pairs
    params: Params
    min_pairs: int
    quarantined: list[dict] = field(default_factory=list)  # screened-out prompts, then each round's pair rows
    n_screened_out: int = 0  # round prompts set aside before sampling (`screen_prompts`)
    perf: dict = field(default_factory=dict)

    @property
    def selected(self) -> dict:
        return next(r for r in self.rounds if r["round"] == self.selected_round)

    def metrics(self) -> dict:
        """Flat keys for the gate + every round's record."""
        sel, it = self.selected, self.params.iterate
        return io.json_safe(
            {
                "selected_round": self.selected_round,
                "selected_kl": sel.get("kl"),
                "selected_kl_ci_high": sel.get("kl_ci_high"),
                "selected_heldout_gap": sel.get("heldout_gap"),
                "selected_heldout_gap_ci_low": sel.get("heldout_gap_ci_low"),
                "selected_task_accuracy": sel.get("task_accuracy"),
                "selected_benchmark_mean": sel.get("benchmark_mean"),
                "selected_reference": sel.get("reference"),
                "n_rounds_run": sum(1 for r in self.rounds if r["round"] > 0),
                "n_prompts_screened_out": self.n_screened_out,
                "decision": self.decision,
                "analysis": self.analysis,
                "rounds": self.rounds,
                "settings": {
                    "rounds": it.rounds,
                    "prompts_per_round": it.prompts_per_round,
                    "reference": it.reference,
                    "max_steps": it.max_steps,
                    "regression_tolerance": it.regression_tolerance,
                    "convergence_epsilon": it.convergence_epsilon,
                    "min_pairs": self.min_pairs,
                    "watched": list(WATCHED),
                    "primary": PRIMARY,
                },
            }
        )


def measure_round(model: nn.Module, tokenizer: Any, ctx: Rounds, label: str) -> tuple[dict, dict]:
    """(metrics, timings) of one round's policy, all against the SFT model: measure_policy + the benchmarks."""
    metrics, timings = measure_policy(model, tokenizer, ctx.probe, ctx.sft_model, accuracy=True, label=label)
    t0 = time.perf_counter()
    bench: dict | None = None
    if ctx.benchmark_fn is not None:
        fused = Path(ctx.work_dir) / "fused"
        export_fused(model, tokenizer, ctx.sft_dir, fused)
        try:
            bench = {k: float(v) for k, v in ctx.benchmark_fn(fused).items()}
        finally:
            shutil.rmtree(fused, ignore_errors=True)
    timings["benchmark_seconds"] = time.perf_counter() - t0
    metrics.update(benchmarks=bench, benchmark_mean=float(np.mean(list(bench.values()))) if bench else None)
    if ctx.categorize is not None:
        t1 = time.perf_counter()
        metrics["categories"] = ctx.categorize(model, tokenizer)
        timings["categories_seconds"] = time.perf_counter() - t1
    return io.json_safe(metrics), timings


def _load_round(rdir: Path, fingerprint: str) -> dict | None:
    path = rdir / STATE_FILE
    if not path.exists():
        return None
    state = io.read_json(path)
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(rdir, ignore_errors=True)
        return None
    return state


def _pair_summary(metrics: Mapping[str, Any]) -> dict:
    keys = (
        "n_pairs",
        "avg_gap",
        "decontamination",
        "n_prompts",
        "n_prompts_with_pair",
        "usable_prompt_fraction",
        "n_quarantined",
        "n_contaminated",
        "passes",
        "temperature_final",
    )
    return {k: metrics.get(k) for k in keys}


def _dpo_summary(m: Mapping[str, Any]) -> dict:
    keys = (
        "kl",
        "kl_target_met",
        "heldout_gap",
        "steps",
        "learning_rate",
        "n_attempts",
        "train",
        "likelihood_displacement",
        "n_train_pairs",
    )
    out = {k: m.get(k) for k in keys}
    out["kl_vs_round_reference"] = out.pop("kl")
    out["heldout_gap_vs_round_reference"] = out.pop("heldout_gap")
    return out


def run_round(
    k: int,
    prompts: Sequence[tuple[int, Mapping[str, Any]]],
    previous: Mapping[str, Any],
    chains: Mapping[int, list[Path]],
    ctx: Rounds,
    origin: str,
) -> RoundOutcome:
    """Round k on `prompts` ((line, item) in the round prompts file `origin`), starting from round k-1's chain."""
    p, it = ctx.params, ctx.params.iterate
    rdir, fp = ctx.work_dir / f"round_{k}", f"{ctx.fingerprint}|round={k}"
    timings: dict = {"round": k}
    lines, items = zip(*prompts)
    reference_name = "sft" if it.reference == "initial" else f"round {k - 1} policy"
    record: dict = {
        "round": k,
        "reference": reference_name,
        "prompts": [lines[0], lines[-1]],
        "n_prompts": len(items),
        "pairs": None,
        "dpo": None,
    }
    t0 = time.perf_counter()
    policy = round_policy(ctx.sft_dir, chains[k - 1], it.reference, k, p.seed, p.model.dtype)
    collected = collect_pairs(
        dataclasses.replace(p.preference, min_pairs=ctx.min_pairs),
        ctx.judge,
        seed=p.seed + ROUND_SEED_STRIDE * k,
        system_prompt=ctx.system_prompt,
        model=policy.model,
        tokenizer=policy.tokenizer,
        items=list(items),
        heldout_items=(),
        eval_texts=ctx.eval_texts,
        items_origin=origin,
        item_locations=[f"{origin}:{line}" for line in lines],
        log=ctx.log,
    )
    pair_metrics = collected.metrics()
    pairs = list(collected.pairs)
    record["pairs"] = _pair_summary(pair_metrics)
    timings["pairs_seconds"] = time.perf_counter() - t0
    failures = pair_gate(p, ctx.min_pairs)(pair_metrics)
    rdir.mkdir(parents=True, exist_ok=True)
    write_pairs(pairs, rdir / "pairs.parquet")

    chain = None
    if not failures:
        max_len = p.preference.max_seq_len
        round_params = round_dpo_params(p.dpo, round_steps(it.max_steps, it.max_epochs, len(pairs), ctx.batch_size))
        t1 = time.perf_counter()
        with policy.as_reference() as ref:
            train_logps = compute_ref_logps(
                ref, policy.tokenizer, pairs, max_len, ctx.batch_size, desc=f"ref logps round {k}"
            )
            held_logps = ctx.probe.heldout_ref_logps
            if it.reference != "initial":  # the held-out gap during training is against the round's reference
                held_logps = compute_ref_logps(
                    ref,
                    policy.tokenizer,
                    ctx.heldout_pairs,
                    max_len,
                    ctx.batch_size,
                    desc=f"ref logps heldout round {k}",
                )
        timings["ref_logps_seconds"] = time.perf_counter() - t1
        probe = dataclasses.replace(ctx.probe, seed=p.seed + k, heldout_ref_logps=held_logps)
        t2 = time.perf_counter()
        try:
            dpo_result = train_dpo(
                policy.model,
                policy.tokenizer,
                pairs,
                train_logps,
                round_params,
                batch_size=ctx.batch_size,
                seed=p.seed + k,
                max_len=max_len,
                checkpoint_dir=rdir / "dpo_checkpoint",
                fingerprint=fp,
                measure=lambda step: measure_policy(policy.model, policy.tokenizer, probe, policy.reference)[0],
            )
        except TrainingDiverged as err:
            dpo_result = None
            failures.append(f"training diverged: {err}")
        timings["train_seconds"] = time.perf_counter() - t2
        if dpo_result is not None:
            record["dpo"] = _dpo_summary(dpo_result.metrics)
            if not dpo_result.kl_target_met:
                failures.append(
                    f"no DPO attempt met dpo.kl_target {round_params.kl_target:g} against the round's reference"
                )
            snapshot = save_snapshot(
                policy, rdir / "policy", loading.model_hash(ctx.sft_dir), k, it.reference, ctx.sft_dir
            )
            chain = chain_for(chains, k, snapshot, finetune_of(chains[0][0]), it.reference)
            t3 = time.perf_counter()
            metrics, eval_timings = measure_round(policy.model, policy.tokenizer, ctx, f"round {k}")
            timings.update(eval_timings, eval_seconds=time.perf_counter() - t3)
            record.update(metrics)
            kl = metrics.get("kl")
            if not finite(kl) or kl > round_params.kl_target:
                failures.append(
                    f"KL(policy || SFT) {kl if kl is None else f'{kl:.4g}'} > dpo.kl_target {round_params.kl_target:g}"
                )
            if not finite(metrics.get(PRIMARY)):
                failures.append(f"{PRIMARY} is not finite")
        shutil.rmtree(rdir / "dpo_checkpoint", ignore_errors=True)
    record["passed"] = not failures
    record["failures"] = failures
    record.update(decide_round(previous, record, it.regression_tolerance, it.convergence_epsilon))
    record = io.json_safe(record)
    quarantined = list(collected.quarantined)
    io.write_json(rdir / STATE_FILE, {"fingerprint": fp, "record": record, "quarantined": quarantined})
    return RoundOutcome(record, pairs, quarantined, chain, timings)


def _resumed_round(k: int, state: Mapping[str, Any], chains: Mapping[int, list[Path]], ctx: Rounds) -> RoundOutcome:
    rdir = ctx.work_dir / f"round_{k}"
    chain = None
    if (rdir / "policy").exists():
        chain = chain_for(chains, k, rdir / "policy", finetune_of(chains[0][0]), ctx.params.iterate.reference)
    return RoundOutcome(state["record"], read_pairs(rdir / "pairs.parquet"), state.get("quarantined", []), chain)


def run_iteration(ctx: Rounds, dpo_dir: Path, round_items: Sequence[Mapping[str, Any]], origin: str) -> IterateResult:
    """Round 0's measurement and up to iterate.rounds on-policy rounds on `round_items` (read from `origin`)."""
    it = ctx.params.iterate
    if it.rounds > 0 and not ctx.judge.generates:
        raise ValueError(
            "iterative training judges the policy's own samples: the judge must score samples "
            "(verifier, reward_model, ...), not import; set iterate.rounds: 0 to skip Stage 6"
        )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    chains: dict[int, list[Path]] = {0: [Path(dpo_dir)]}
    outcomes: dict[int, RoundOutcome] = {}
    perf: dict = {"rounds": []}
    screened, screened_out = screen_prompts(
        round_items, ctx.eval_texts, ctx.params.preference.decontamination_ngram, ctx.system_prompt, origin
    )
    if screened_out:
        ctx.log(f"{len(screened_out)} of {len(round_items)} round prompts overlap an evaluation set: set aside")
    t_start = time.perf_counter()

    # round 0: the Stage 5 policy, measured exactly as every later round
    rdir = ctx.work_dir / "round_0"
    state = _load_round(rdir, f"{ctx.fingerprint}|round=0")
    if state is None:
        model, tokenizer, _, _ = load_chain(ctx.sft_dir, chains[0], ctx.params.model.dtype)
        metrics, timings = measure_round(model, tokenizer, ctx, "round 0")
        record = {
            "round": 0,
            "reference": "sft (Stage 5)",
            "n_prompts": 0,
            "pairs": None,
            "dpo": None,
            **metrics,
            "passed": True,
            "failures": [],
            "decision": "baseline",
            "reasons": ["the Stage 5 policy (models/dpo), passed gate_dpo"],
            "deltas": {},
        }
        io.write_json(rdir / STATE_FILE, {"fingerprint": f"{ctx.fingerprint}|round=0", "record": record})
        perf["rounds"].append({"round": 0, **timings})
        del model
    else:
        record = state["record"]
    records = [record]
    ctx.log(f"round 0 (Stage 5 policy): held-out gap {record.get('heldout_gap')}, KL {record.get('kl')}")

    stop: str | None = None
    for k in range(1, it.rounds + 1):
        start, end = round_slice(len(screened), k, it.prompts_per_round)
        chosen = screened[start:end] if ctx.choose_prompts is None else ctx.choose_prompts(k, screened, chains, records)
        if not chosen:
            stop = "out_of_prompts"
            ctx.log(f"round {k}: no fresh prompts left in {origin}")
            break
        state = _load_round(ctx.work_dir / f"round_{k}", f"{ctx.fingerprint}|round={k}")
        if state is not None:  # finished before a kill: reuse
            outcome = _resumed_round(k, state, chains, ctx)
            ctx.log(f"round {k}: resumed ({outcome.record['decision']})")
        else:
            outcome = run_round(k, chosen, records[-1], chains, ctx, origin)
            perf["rounds"].append(outcome.timings)
        outcomes[k] = outcome
        if outcome.chain is not None:
            chains[k] = outcome.chain
        records.append(outcome.record)
        ctx.log(f"round {k}: {outcome.record['decision']}: {'; '.join(outcome.record['reasons'])}")
        if outcome.record["decision"] != "continue":
            break

    selected = select_round(records)
    decision = overall_decision(records, it.rounds, stop)
    analysis = convergence_analysis(records, selected, decision, it.regression_tolerance, it.convergence_epsilon)
    perf["total_seconds"] = time.perf_counter() - t_start
    return IterateResult(
        rounds=records,
        selected_round=selected,
        decision=decision,
        analysis=analysis,
        chains=chains,
        pairs={k: o.pairs for k, o in outcomes.items()},
        params=ctx.params,
        min_pairs=ctx.min_pairs,
        perf=perf,
        quarantined=screened_out + [row for k in sorted(outcomes) for row in outcomes[k].quarantined],
        n_screened_out=len(screened_out),
    )
