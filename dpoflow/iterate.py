"""Stage 6: iterative (on-policy) DPO rounds, compared round by round, with rollback and convergence.

Round 0 is the Stage 5 policy (`models/dpo`). Round k = 1 .. iterate.rounds:

    items   = screened[(k-1)*P : k*P]                              P = iterate.prompts_per_round (disjoint rounds)
              screened: data/tasks/rounds.jsonl without the prompts that overlap an evaluation set
              (`screen_prompts`, set aside with their reason before any sampling)
    pairs   = preference.build_preference_data(policy_{k-1}, judge, items)      on-policy samples, judged,
              validated by Stage 2's validator; the round FAILS if they fail the preference_data checks, with
              n_pairs compared to iterate.min_pairs instead of preference.min_pairs (`round_min_pairs`)
    ref     = iterate.reference: initial  -> the SFT model (LoRA disabled)
                                 previous -> policy_{k-1} (its adapters fused into the weights, fresh LoRA on top)
    ref_logps of the round's pairs under `ref`; then dpo.train_dpo (KL rule included: the KL there is against the
    round's reference) for iterate.max_steps steps (capped at iterate.max_epochs passes over the round's pairs),
    starting from policy_{k-1}.

After every round (and for round 0) the SAME measurements, always against the SFT model so rounds compare:
KL(policy || SFT) (policy.measure_kl, Stage 3's prompts and seed), the held-out preference gap on
data/heldout_pairs.parquet (Stage 3's cached SFT log-probs), greedy task accuracy on data/tasks/heldout.jsonl
(sft.greedy_accuracy) and the capability benchmarks on a fused copy (same tasks/settings as Stage 1).

`decide_round` (pure) compares a round with the previous one: a failed round or a drop of any watched metric by
more than iterate.regression_tolerance -> "rollback" (stop; the previous round stays selected); a change of the
held-out gap below iterate.convergence_epsilon -> "converged" (stop); a gain of at least epsilon -> "continue"; a
loss between epsilon and the tolerance -> "converged" too (no further gain; the better earlier round is selected).
`select_round` picks, among round 0 and the rounds that passed every check and were not rolled back, the one with
the highest held-out gap (ties: the earlier round, i.e. less drift from SFT).

A round's policy is a *chain* of snapshots applied to the SFT weights (`load_chain`): with LoRA and reference
`initial` one adapter set relative to SFT (it keeps training round after round); with `previous` the adapters of
round 0..k, each fused before the next is attached; with full fine-tuning one full weight folder.
`models/selected` holds that chain + `selection.json` (round, reference, chain); `load_selected` rebuilds it.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from dpoflow import io, models
from dpoflow.batching import encode_pair
from dpoflow.data import read_pairs, write_pairs
from dpoflow.dpo import heldout_metrics, train_dpo
from dpoflow.policy import (POLICY_CONFIG, base_parameters, compute_ref_logps, load_policy, measure_kl, pad_id_of)
from dpoflow.sft import greedy_accuracy
from dpoflow.tasks import item_prompt
from dpoflow.trainer import TrainingDiverged
from dpoflow.training_metrics import EvalIndex

REFERENCES = ("initial", "previous")
# Metrics compared between rounds; a drop of any of them by more than iterate.regression_tolerance is a regression.
# heldout_gap: the DPO objective on held-out pairs; task_accuracy: greedy accuracy on the held-out task items;
# benchmark_mean: mean lm-eval score (capability). All in comparable absolute units ([-1, 1] / [0, 1]).
WATCHED = ("heldout_gap", "task_accuracy", "benchmark_mean")
PRIMARY = "heldout_gap"  # improvement / convergence are judged on this one
SELECTION_FILE = "selection.json"
STATE_FILE = "round.json"
SELECTION_FORMAT = "dpoflow-selected-v1"
ROUND_SEED_STRIDE = 1000  # round k samples with seed + k * stride (Stage 2's passes use seed + pass)


# ---------------------------------------------------------------------------------------------------------
# Pure decision logic


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def decide_round(previous: Mapping[str, Any], current: Mapping[str, Any], regression_tolerance: float,
                 convergence_epsilon: float) -> dict:
    """Compare round `current` with round `previous` (metric dicts as in `IterateResult.rounds`).

    Returns {"decision": "continue" | "rollback" | "converged", "reasons": [str], "deltas": {metric: cur - prev}}.
    Rules, in order:
      1. current["passed"] is False (a failed check: pairs, KL, divergence)   -> rollback
      2. any WATCHED metric fell by more than regression_tolerance              -> rollback
      3. |delta of PRIMARY| < convergence_epsilon                              -> converged (stable)
      4. delta of PRIMARY >= convergence_epsilon                               -> continue (improving)
      5. otherwise (PRIMARY fell by epsilon .. tolerance)                      -> converged (no further gain)
    Metrics missing (None) on either side are not compared; a missing PRIMARY on the current round is a failure.
    """
    if regression_tolerance < 0 or convergence_epsilon < 0:
        raise ValueError("regression_tolerance and convergence_epsilon must be >= 0")
    deltas = {key: current[key] - previous[key] for key in WATCHED
              if _finite(current.get(key)) and _finite(previous.get(key))}
    if not current.get("passed", False):
        failures = list(current.get("failures") or ["the round failed a check"])
        return {"decision": "rollback", "reasons": failures, "deltas": deltas}
    if not _finite(current.get(PRIMARY)):
        return {"decision": "rollback", "reasons": [f"{PRIMARY} is missing or not finite"], "deltas": deltas}
    regressions = [f"{key} fell by {-d:.4g} ({previous[key]:.4g} -> {current[key]:.4g}) > iterate.regression_tolerance "
                   f"{regression_tolerance:g}" for key, d in deltas.items() if -d > regression_tolerance]
    if regressions:
        return {"decision": "rollback", "reasons": regressions, "deltas": deltas}
    delta = deltas.get(PRIMARY)
    if delta is None:  # the previous round has no primary metric: nothing to compare, keep going
        return {"decision": "continue", "reasons": [f"no previous {PRIMARY} to compare with"], "deltas": deltas}
    if abs(delta) < convergence_epsilon:
        return {"decision": "converged", "reasons": [f"{PRIMARY} changed by {delta:+.4g}, below "
                                                     f"iterate.convergence_epsilon {convergence_epsilon:g}: stable"],
                "deltas": deltas}
    if delta >= convergence_epsilon:
        return {"decision": "continue", "reasons": [f"{PRIMARY} improved by {delta:+.4g} (>= "
                                                    f"iterate.convergence_epsilon {convergence_epsilon:g}), no "
                                                    "regression beyond tolerance"],
                "deltas": deltas}
    return {"decision": "converged", "reasons": [f"{PRIMARY} fell by {-delta:.4g}, within iterate.regression_tolerance "
                                                 f"{regression_tolerance:g}: no further gain, the better earlier round "
                                                 "is kept"], "deltas": deltas}


def eligible(record: Mapping[str, Any]) -> bool:
    """A round that may be selected: round 0, or a round that passed every check and was not rolled back."""
    return record["round"] == 0 or (bool(record.get("passed")) and record.get("decision") != "rollback")


def select_round(rounds: Sequence[Mapping[str, Any]]) -> int:
    """The eligible round with the highest PRIMARY metric; ties go to the earlier round (less drift from SFT).
    Round 0 (the Stage 5 policy) is always eligible, so there is always a selection."""
    best, best_value = 0, None
    for record in rounds:
        if not eligible(record):
            continue
        value = record.get(PRIMARY)
        value = value if _finite(value) else -math.inf
        if best_value is None or value > best_value:
            best, best_value = record["round"], value
    return best


def overall_decision(rounds: Sequence[Mapping[str, Any]], planned: int, stop: Optional[str]) -> str:
    """How the iteration ended: no_rounds | out_of_prompts | rolled_back | converged | max_rounds."""
    if planned == 0:
        return "no_rounds"
    if stop is not None:
        return stop
    last = rounds[-1]
    if last["round"] == 0:
        return "no_rounds"
    return {"rollback": "rolled_back", "converged": "converged"}.get(last.get("decision"), "max_rounds")


def round_min_pairs(iterate_min_pairs: Optional[int], preference_min_pairs: int, prompts_per_round: int,
                    pref_prompts: Optional[int]) -> int:
    """Minimum valid pairs for a round: iterate.min_pairs when set; otherwise Stage 2's preference.min_pairs scaled
    by prompts_per_round / data.sizes.pref_prompts (rounded up, at least 1)."""
    if iterate_min_pairs is not None:
        return int(iterate_min_pairs)
    if not pref_prompts:
        return max(1, int(preference_min_pairs))
    return max(1, math.ceil(preference_min_pairs * prompts_per_round / pref_prompts))


def round_slice(n_items: int, round_index: int, per_round: int) -> tuple[int, int]:
    """[start, stop) of round `round_index`'s (1-based) prompts in rounds.jsonl; empty when exhausted."""
    start = min(n_items, (round_index - 1) * per_round)
    return start, min(n_items, start + per_round)


def screen_prompts(items: Sequence[Mapping[str, Any]], eval_texts: Optional[Mapping[str, list[str]]], ngram: int,
                   system_prompt: Optional[str], origin: str) -> tuple[list[tuple[int, Mapping[str, Any]]], list[dict]]:
    """Split the round prompts into ((line number, item) of the clean ones, quarantine rows of the others).

    A prompt is set aside when its messages overlap an evaluation set by Stage 2's test (`validate_dpo_pairs`'s
    n-gram / whole-short-text match, same n). Stage 2 samples first and quarantines contaminated pairs, and its
    decontamination fraction measures that; a round is small and the contaminated prompts (short add_3term
    sums, ~4% of rounds.jsonl) are the ones most likely to make a pair, so without screening a round's fraction
    fell under 0.9 (10 of 89 on 2026-12-03) and the round was rolled back before training. The pair check still
    runs on what the round generates: a response can overlap an evaluation set on its own.
    """
    lines = list(enumerate(items, 1))
    if not eval_texts:
        return lines, []
    index = EvalIndex(dict(eval_texts), ngram)
    clean, quarantined = [], []
    for line, item in lines:
        prompt = item_prompt(item, system_prompt)
        hits = index.matches([(f"prompt[{i}].content", m["content"]) for i, m in enumerate(prompt)])
        if hits:
            quarantined.append({"location": f"{origin}:{line}", "field": next(iter(hits.values())),
                                "reason": f"contaminated prompt: {', '.join(hits)}", "row": dict(item)})
        else:
            clean.append((line, item))
    return clean, quarantined


def convergence_analysis(rounds: Sequence[Mapping[str, Any]], selected: int, decision: str,
                         tolerance: float, epsilon: float) -> str:
    """A short text: the trajectory of the watched metrics, why the iteration stopped, what was selected."""
    lines = []
    trained = [r for r in rounds if r["round"] > 0]
    fmt = lambda v: "n/a" if not _finite(v) else f"{v:.4g}"  # noqa: E731
    traj = " -> ".join(f"r{r['round']} {fmt(r.get(PRIMARY))}" for r in rounds)
    lines.append(f"Held-out preference gap by round: {traj}.")
    kl = " -> ".join(f"r{r['round']} {fmt(r.get('kl'))}" for r in rounds)
    lines.append(f"KL(policy || SFT) by round: {kl}.")
    acc = " -> ".join(f"r{r['round']} {fmt(r.get('task_accuracy'))}" for r in rounds)
    lines.append(f"Held-out task accuracy by round: {acc}.")
    if any(_finite(r.get("benchmark_mean")) for r in rounds):
        bench = " -> ".join(f"r{r['round']} {fmt(r.get('benchmark_mean'))}" for r in rounds)
        lines.append(f"Mean benchmark score by round: {bench}.")
    explain = {
        "no_rounds": "No iterative round ran (iterate.rounds is 0): the Stage 5 policy is the result.",
        "out_of_prompts": "Stopped: data/tasks/rounds.jsonl has no fresh prompts left for another round "
                          "(raise data.sizes.rounds or lower iterate.prompts_per_round).",
        "rolled_back": "Stopped with a rollback: the last round failed a check or regressed beyond "
                       f"iterate.regression_tolerance {tolerance:g}; its policy was discarded.",
        "converged": f"Stopped as converged: the held-out gap moved by less than iterate.convergence_epsilon "
                     f"{epsilon:g} (or fell within the tolerance): another round is not expected to help.",
        "max_rounds": "Stopped after the planned number of rounds while still improving: more rounds "
                      "(iterate.rounds) may help further.",
    }
    lines.append(explain.get(decision, f"Stopped: {decision}."))
    if trained:
        last = trained[-1]
        lines.append(f"Last round {last['round']}: {last.get('decision')} ({'; '.join(last.get('reasons') or [])}).")
    lines.append(f"Selected round {selected} (the best eligible held-out gap; ties go to the earlier round).")
    return " ".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class IterateSettings:
    rounds: int = 2
    prompts_per_round: int = 400
    reference: str = "initial"
    max_steps: int = 60
    max_epochs: Optional[float] = None
    regression_tolerance: float = 0.02
    convergence_epsilon: float = 0.005
    min_pairs: int = 100
    seed: int = 0
    batch_size: int = 8
    max_len: int = 128
    system_prompt: Optional[str] = None
    kl_samples: int = 1
    kl_max_tokens: int = 24
    accuracy_max_tokens: int = 16    # as Stage 1's validation accuracy (sft.greedy_accuracy's default)
    dtype: Optional[str] = "float32"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"iterate.reference must be one of {REFERENCES}, got {self.reference!r}")

    @classmethod
    def from_params(cls, p: Any, batch_size: int) -> "IterateSettings":
        it = p.iterate
        sizes = p.data.sizes or {}
        min_pairs = round_min_pairs(getattr(it, "min_pairs", None), p.preference.min_pairs, it.prompts_per_round,
                                    sizes.get("pref_prompts"))
        return cls(rounds=it.rounds, prompts_per_round=it.prompts_per_round, reference=it.reference,
                   max_steps=it.max_steps, max_epochs=it.max_epochs,
                   regression_tolerance=it.regression_tolerance,
                   convergence_epsilon=it.convergence_epsilon, min_pairs=min_pairs, seed=p.seed,
                   batch_size=batch_size, max_len=p.preference.max_seq_len,
                   system_prompt=p.data.system_prompt or None, kl_samples=p.init.kl_samples,
                   kl_max_tokens=p.init.kl_max_tokens, dtype=p.model.dtype)


def round_steps(max_steps: int, max_epochs: Optional[float], n_pairs: int, batch_size: int) -> int:
    """A round's DPO steps: iterate.max_steps, capped at iterate.max_epochs passes over its pairs (at least 1)."""
    if max_epochs is None:
        return max_steps
    return max(1, min(max_steps, math.ceil(max_epochs * n_pairs / batch_size)))


def round_dpo_params(dpo_params: Any, max_steps: int) -> Any:
    """Stage 5's DPO params for one round: `max_steps` steps, warmup capped at half of them."""
    return dataclasses.replace(dpo_params, max_steps=max_steps,
                               warmup_steps=min(dpo_params.warmup_steps, max_steps // 2))


def make_pair_gate(p: Any, min_pairs: int) -> Callable[[Mapping[str, Any]], list[str]]:
    """Stage 2's gate (gates.gate_checks("preference_data")) with n_pairs against `min_pairs` (iterate.min_pairs).
    Returns a function metrics -> failure messages (empty = passed)."""
    from dpoflow.gates import evaluate_gate

    p_round = dataclasses.replace(p, preference=dataclasses.replace(p.preference, min_pairs=int(min_pairs)))

    def check(metrics: Mapping[str, Any]) -> list[str]:
        result = evaluate_gate("preference_data", dict(metrics), p_round)
        return [r.message().replace("(preference.min_pairs)", "(iterate.min_pairs)")
                .replace("data.sizes.pref_prompts", "iterate.prompts_per_round")
                for r in result.results if not r.passed]

    return check


# ---------------------------------------------------------------------------------------------------------
# Policy chains


def _is_lora(module: nn.Module) -> bool:
    return "lora_a" in module and "lora_b" in module


def finetune_of(snapshot: Path) -> str:
    return io.read_json(Path(snapshot) / POLICY_CONFIG)["fine_tune_type"]


def load_chain(sft_dir: Path, chain: Sequence[Path], dtype: Optional[str] = "float32"
               ) -> tuple[nn.Module, Any, Optional[nn.Module], Optional[dict]]:
    """Rebuild a round's policy from its chain of snapshots: (model, tokenizer, reference, adapter_config).

    LoRA: SFT weights, every snapshot but the last fused in turn, the last attached as trainable LoRA adapters;
    reference None (= the model with its adapters disabled, i.e. SFT + the fused snapshots). Full: the last
    snapshot's weights (dpoflow.policy.load_policy), reference = the SFT model."""
    chain = [Path(c) for c in chain]
    if not chain:
        raise ValueError("empty policy chain")
    if finetune_of(chain[-1]) == "full":
        policy = load_policy(Path(sft_dir), chain[-1], dtype=dtype)
        return policy.model, policy.tokenizer, policy.reference, None
    model, tokenizer = models.load_model(sft_dir, dtype=dtype)
    model.freeze()
    for snapshot in chain[:-1]:
        models.load_adapters(model, snapshot)
        models.fuse_lora(model)
        model.freeze()
    models.load_adapters(model, chain[-1])
    mx.eval(model.parameters())
    return model, tokenizer, None, io.read_json(chain[-1] / "adapter_config.json")


def fused_parameters(model: nn.Module) -> dict[str, mx.array]:
    """The model's weights with every LoRA update merged in, named as in the plain model (the model is unchanged)."""
    flat = base_parameters(model)
    for name, module in model.named_modules():
        if _is_lora(module) and hasattr(module, "fuse"):
            fused = module.fuse()
            flat[f"{name}.weight"] = fused.weight
            if "bias" in fused:
                flat[f"{name}.bias"] = fused.bias
    return flat


def export_fused(model: nn.Module, tokenizer: Any, sft_dir: Path, out_dir: Path) -> Path:
    """Write `model` (LoRA merged) as a standalone mlx-lm folder with SFT's config and tokenizer files."""
    plain, _ = models.load_model(sft_dir, lazy=True)
    plain.update(tree_unflatten(list(fused_parameters(model).items())))
    mx.eval(plain.parameters())
    return models.save_model(plain, tokenizer, Path(out_dir), io.read_json(Path(sft_dir) / "config.json"))


def _frozen_copy(model: nn.Module, sft_dir: Path) -> nn.Module:
    """A frozen module holding `model`'s current arrays (MLX arrays are immutable: no copy is made)."""
    ref, _ = models.load_model(sft_dir, lazy=True)
    ref.update(model.parameters())
    ref.freeze()
    mx.eval(ref.parameters())
    return ref


@dataclass
class RoundPolicy:
    model: nn.Module
    tokenizer: Any
    reference: Optional[nn.Module]   # None: the model with its LoRA adapters disabled
    finetune: str
    adapter_config: Optional[dict]

    @contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
        else:
            with models.lora_disabled(self.model) as ref:
                yield ref


def training_policy(sft_dir: Path, chain: Sequence[Path], reference: str, round_index: int, seed: int,
                    dtype: Optional[str] = "float32") -> RoundPolicy:
    """The policy that round `round_index` trains, starting from the previous round's chain, and its reference.

    initial: the chain as is (LoRA continues; reference = SFT). previous: LoRA -> the whole chain fused, fresh
    LoRA adapters (same config, B = 0, seeded by seed + round) attached: reference = the adapters disabled = the
    previous policy; full -> reference = a frozen copy of the previous weights."""
    model, tokenizer, ref, adapter_config = load_chain(sft_dir, chain, dtype)
    if adapter_config is None:  # full fine-tuning
        if reference == "previous":
            ref = _frozen_copy(model, Path(sft_dir))
        return RoundPolicy(model, tokenizer, ref, "full", None)
    if reference == "previous":
        models.fuse_lora(model)
        model.freeze()
        lp = adapter_config["lora_parameters"]
        adapter_config = models.attach_lora(model, rank=lp["rank"], scale=lp["scale"], dropout=lp.get("dropout", 0.0),
                                            num_layers=adapter_config["num_layers"], keys=lp.get("keys"),
                                            seed=seed + round_index)
        mx.eval(model.parameters())
    return RoundPolicy(model, tokenizer, None, "lora", adapter_config)


def save_snapshot(policy: RoundPolicy, out_dir: Path, sft_hash: str, round_index: int, reference: str,
                  sft_dir: Path) -> Path:
    """A round's snapshot: LoRA adapters (+ adapter_config.json) or full weights, plus policy_config.json."""
    out_dir = Path(out_dir)
    with io.atomic_path(out_dir) as tmp:  # weights and policy_config.json appear together, or not at all
        if policy.finetune == "lora":
            models.save_adapters(policy.model, tmp, policy.adapter_config)
            weights = "adapters.safetensors"
        else:
            models.save_model(policy.model, policy.tokenizer, tmp, io.read_json(Path(sft_dir) / "config.json"))
            weights = "model.safetensors"
        io.write_json(tmp / POLICY_CONFIG, {
            "fine_tune_type": policy.finetune, "reference_hash": sft_hash, "weights": weights, "round": round_index,
            # previous-reference LoRA adapters apply on top of the earlier rounds fused, not on SFT: use load_selected
            "applies_to": "sft" if (policy.finetune == "full" or reference == "initial") else "chain"})
    return out_dir


def chain_for(chains: Mapping[int, list[Path]], round_index: int, snapshot: Path, finetune: str,
              reference: str) -> list[Path]:
    """The chain of round `round_index` given the previous round's and this round's snapshot."""
    if finetune == "lora" and reference == "previous":
        return list(chains[round_index - 1]) + [Path(snapshot)]
    return [Path(snapshot)]


def save_selected(out_dir: Path, chain: Sequence[Path], info: Mapping[str, Any]) -> Path:
    """models/selected: chain/00.. (the snapshots), selection.json; with a single LoRA snapshot its adapter files
    also at the top level, so `mlx_lm.generate --model models/sft --adapter-path models/selected` works."""
    chain = [Path(c) for c in chain]
    with io.atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        names = []
        for i, snapshot in enumerate(chain):
            name = f"chain/{i:02d}"
            shutil.copytree(snapshot, tmp / name)
            names.append(name)
        adapter_path = len(chain) == 1 and finetune_of(chain[0]) == "lora"
        if adapter_path:
            for f in ("adapters.safetensors", "adapter_config.json", POLICY_CONFIG):
                shutil.copyfile(chain[0] / f, tmp / f)
        io.write_json(tmp / SELECTION_FILE, {**dict(info), "format": SELECTION_FORMAT, "chain": names,
                                             "finetune": finetune_of(chain[-1]), "mlx_lm_adapter_path": adapter_path})
    return Path(out_dir)


def read_selection(selected_dir: Path) -> dict:
    path = Path(selected_dir) / SELECTION_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run Stage 6 (dvc repro iterate)")
    selection = io.read_json(path)
    if selection.get("format") != SELECTION_FORMAT:
        raise ValueError(f"{path}: not a dpoflow selection (format {selection.get('format')!r})")
    return selection


def load_selected(sft_dir: Path, selected_dir: Path, dtype: Optional[str] = "float32", fuse: bool = True
                  ) -> tuple[nn.Module, Any, dict]:
    """(model, tokenizer, selection) of models/selected on the SFT model. fuse=True gives a plain model (LoRA merged);
    fuse=False keeps the last snapshot's adapters attached."""
    selection = read_selection(selected_dir)
    sft_hash = models.model_hash(Path(sft_dir))
    if selection.get("reference_hash") not in (None, sft_hash):
        raise ValueError(f"{selected_dir} was trained on an SFT model with hash {selection['reference_hash'][:12]}, "
                         f"but {sft_dir} has hash {sft_hash[:12]}: rerun Stage 6 (dvc repro iterate)")
    chain = [Path(selected_dir) / name for name in selection["chain"]]
    model, tokenizer, _, adapter_config = load_chain(sft_dir, chain, dtype)
    if fuse and adapter_config is not None:
        models.fuse_lora(model)
    if fuse:
        model.freeze()
        mx.eval(model.parameters())
    return model, tokenizer, selection


# ---------------------------------------------------------------------------------------------------------
# Round evaluation


@dataclass
class EvalContext:
    """Everything a round's end-of-round measurement needs (the same for every round)."""

    sft_dir: Path
    sft_model: nn.Module                     # the SFT model: KL reference for every round
    kl_prompts: Sequence[Sequence[Mapping[str, str]]]
    heldout_pairs: Sequence[Mapping[str, Any]]
    heldout_sft_logps: Mapping[str, np.ndarray]   # Stage 3's cache, heldout split (SFT reference)
    heldout_items: Sequence[Mapping[str, Any]]    # data/tasks/heldout.jsonl (task accuracy)
    beta: float
    length_normalize: bool
    benchmark_fn: Optional[Callable[[Path], Mapping[str, float]]] = None  # fused model dir -> {task: score}
    work_dir: Optional[Path] = None


def evaluate_policy(model: nn.Module, tokenizer: Any, ctx: EvalContext, s: IterateSettings, label: str
                    ) -> tuple[dict, dict]:
    """(metrics, timings) of one round's policy, all against the SFT model."""
    timings = {}
    t0 = time.perf_counter()
    kl = measure_kl(model, tokenizer, ctx.kl_prompts, ctx.sft_model, s.seed, s.kl_samples, s.kl_max_tokens)
    t1 = time.perf_counter()
    pad = pad_id_of(tokenizer)
    encoded = [encode_pair(tokenizer, row, s.max_len) for row in ctx.heldout_pairs]
    held = heldout_metrics(model, encoded, ctx.heldout_sft_logps, ctx.beta, ctx.length_normalize, pad,
                           2 * s.batch_size)
    t2 = time.perf_counter()
    acc = greedy_accuracy(model, tokenizer, list(ctx.heldout_items), s.system_prompt, max_tokens=s.accuracy_max_tokens,
                          desc=f"accuracy {label}") if ctx.heldout_items else {"accuracy": None}
    t3 = time.perf_counter()
    bench: Optional[dict] = None
    if ctx.benchmark_fn is not None:
        if ctx.work_dir is None:
            raise ValueError("benchmarks need a work_dir for the fused copy")
        fused = Path(ctx.work_dir) / "fused"
        export_fused(model, tokenizer, ctx.sft_dir, fused)
        try:
            bench = {k: float(v) for k, v in ctx.benchmark_fn(fused).items()}
        finally:
            shutil.rmtree(fused, ignore_errors=True)
    t4 = time.perf_counter()
    timings.update(kl_seconds=t1 - t0, heldout_seconds=t2 - t1, accuracy_seconds=t3 - t2, benchmark_seconds=t4 - t3)
    metrics = {"kl": kl["kl"], "kl_seq": kl["kl_seq"], "k3": kl["k3"], "kl_n_tokens": kl["n_tokens"],
               **held, "task_accuracy": acc["accuracy"], "benchmarks": bench,
               "benchmark_mean": float(np.mean(list(bench.values()))) if bench else None}
    return _clean(metrics), timings


def _clean(value: Any) -> Any:
    """NaN/Inf -> None, numpy scalars -> python (JSON-safe, deterministic)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class IterateResult:
    rounds: list[dict]                    # one record per round, round 0 first (deterministic)
    selected_round: int
    decision: str                         # overall_decision
    analysis: str
    chains: dict[int, list[Path]]         # round -> snapshot chain (round 0: [models/dpo])
    pairs: dict[int, list[dict]]          # round -> its validated on-policy pairs
    settings: IterateSettings
    quarantined: list[dict] = field(default_factory=list)  # screened-out prompts, then each round's pair rows
    n_screened_out: int = 0               # round prompts set aside before sampling (`screen_prompts`)
    perf: dict = field(default_factory=dict)

    @property
    def selected(self) -> dict:
        return next(r for r in self.rounds if r["round"] == self.selected_round)

    def metrics(self) -> dict:
        """metrics/iterate.json: flat keys for the gate + every round's record."""
        sel = self.selected
        s = self.settings
        return _clean({
            "selected_round": self.selected_round,
            "selected_kl": sel.get("kl"),
            "selected_heldout_gap": sel.get("heldout_gap"),
            "selected_task_accuracy": sel.get("task_accuracy"),
            "selected_benchmark_mean": sel.get("benchmark_mean"),
            "selected_reference": sel.get("reference"),
            "n_rounds_run": sum(1 for r in self.rounds if r["round"] > 0),
            "n_prompts_screened_out": self.n_screened_out,
            "decision": self.decision,
            "analysis": self.analysis,
            "rounds": self.rounds,
            "settings": {"rounds": s.rounds, "prompts_per_round": s.prompts_per_round, "reference": s.reference,
                         "max_steps": s.max_steps, "regression_tolerance": s.regression_tolerance,
                         "convergence_epsilon": s.convergence_epsilon, "min_pairs": s.min_pairs,
                         "watched": list(WATCHED), "primary": PRIMARY},
        })


def _load_round(rdir: Path, fingerprint: str) -> Optional[dict]:
    path = rdir / STATE_FILE
    if not path.exists():
        return None
    state = io.read_json(path)
    if state.get("fingerprint") != fingerprint:
        shutil.rmtree(rdir, ignore_errors=True)
        return None
    return state


def _pair_summary(metrics: Mapping[str, Any]) -> dict:
    keys = ("n_pairs", "avg_gap", "decontamination", "n_prompts", "n_prompts_with_pair", "usable_prompt_fraction",
            "n_quarantined", "n_contaminated", "passes", "temperature_final")
    return {k: metrics.get(k) for k in keys}


def _dpo_summary(m: Mapping[str, Any]) -> dict:
    keys = ("kl", "kl_target_met", "heldout_gap", "steps", "learning_rate", "n_attempts", "train",
            "likelihood_displacement", "n_train_pairs")
    out = {k: m.get(k) for k in keys}
    out["kl_vs_round_reference"] = out.pop("kl")
    out["heldout_gap_vs_round_reference"] = out.pop("heldout_gap")
    return out


def run_iteration(
    *,
    sft_dir: Path,
    dpo_dir: Path,
    round_items: Sequence[Mapping[str, Any]],
    judge: Any,
    preference_config: Any,
    eval_texts: Optional[dict[str, list[str]]],
    pair_gate: Callable[[Mapping[str, Any]], list[str]],
    dpo_params: Any,
    settings: IterateSettings,
    ctx: EvalContext,
    work_dir: Path,
    fingerprint: str = "",
    rounds_origin: str = "data/tasks/rounds.jsonl",
    log: Callable[[str], None] = lambda message: None,
) -> IterateResult:
    """Run round 0's measurement and up to settings.rounds on-policy rounds (module docstring).

    judge: a dpoflow.judges.Judge that scores (verifier / reward_model). preference_config: Stage 2's
    PreferenceConfig (its min_pairs is replaced by settings.min_pairs, its seed by seed + round * 1000).
    pair_gate: metrics -> failures (`make_pair_gate`). dpo_params: params.DpoParams (max_steps replaced by
    `round_steps(settings.max_steps, settings.max_epochs, ...)`). work_dir holds each round's state (round.json,
    pairs, quarantine rows, snapshot, DPO checkpoints): a killed run resumes at the first round not finished, as long
    as `fingerprint` matches.
    """
    from dpoflow.preference import build_preference_data

    s = settings
    if s.rounds > 0 and not getattr(judge, "generates", True):
        raise ValueError("iterative training judges the policy's own samples: preference.judge must be a scoring judge "
                         "(verifier or reward_model), not import; set iterate.rounds: 0 to skip Stage 6")
    sft_dir, dpo_dir, work_dir = Path(sft_dir), Path(dpo_dir), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx.work_dir = ctx.work_dir or work_dir
    sft_hash = models.model_hash(sft_dir)
    finetune = finetune_of(dpo_dir)
    records: list[dict] = []
    chains: dict[int, list[Path]] = {0: [dpo_dir]}
    pairs_by_round: dict[int, list[dict]] = {}
    quarantined_by_round: dict[int, list[dict]] = {}
    perf: dict = {"rounds": []}
    screened, screened_out = screen_prompts(round_items, eval_texts, preference_config.decontamination_ngram,
                                            preference_config.system_prompt, rounds_origin)
    if screened_out:
        log(f"{len(screened_out)} of {len(round_items)} round prompts overlap an evaluation set: set aside")
    t_start = time.perf_counter()

    # round 0: the Stage 5 policy, measured exactly as every later round
    rdir = work_dir / "round_0"
    state = _load_round(rdir, f"{fingerprint}|round=0")
    if state is None:
        model, tokenizer, _, _ = load_chain(sft_dir, chains[0], s.dtype)
        metrics, timings = evaluate_policy(model, tokenizer, ctx, s, "round 0")
        record = {"round": 0, "reference": "sft (Stage 5)", "n_prompts": 0, "pairs": None, "dpo": None, **metrics,
                  "passed": True, "failures": [], "decision": "baseline",
                  "reasons": ["the Stage 5 policy (models/dpo), passed gate_dpo"], "deltas": {}}
        io.write_json(rdir / STATE_FILE, {"fingerprint": f"{fingerprint}|round=0", "record": record})
        perf["rounds"].append({"round": 0, **timings})
        del model
    else:
        record = state["record"]
    records.append(record)
    log(f"round 0 (models/dpo): held-out gap {record.get('heldout_gap')}, KL {record.get('kl')}")

    stop: Optional[str] = None
    for k in range(1, s.rounds + 1):
        start, end = round_slice(len(screened), k, s.prompts_per_round)
        if start == end:
            stop = "out_of_prompts"
            log(f"round {k}: no fresh prompts left in {rounds_origin}")
            break
        rdir = work_dir / f"round_{k}"
        fp = f"{fingerprint}|round={k}"
        state = _load_round(rdir, fp)
        timings: dict = {"round": k}
        if state is not None:  # finished before a kill: reuse
            record = state["record"]
            pairs_by_round[k] = read_pairs(rdir / "pairs.parquet")
            quarantined_by_round[k] = state.get("quarantined", [])
            if (rdir / "policy").exists():
                chains[k] = chain_for(chains, k, rdir / "policy", finetune, s.reference)
            log(f"round {k}: resumed ({record['decision']})")
        else:
            record, timings = _run_round(k, start, end, rdir, fp, chains, pairs_by_round, quarantined_by_round,
                                         records[-1], sft_dir=sft_dir, sft_hash=sft_hash, finetune=finetune,
                                         screened=screened, judge=judge, preference_config=preference_config,
                                         eval_texts=eval_texts, pair_gate=pair_gate, dpo_params=dpo_params,
                                         s=s, ctx=ctx, rounds_origin=rounds_origin,
                                         build_preference_data=build_preference_data, log=log)
            perf["rounds"].append(timings)
        records.append(record)
        log(f"round {k}: {record['decision']}: {'; '.join(record['reasons'])}")
        if record["decision"] != "continue":
            break

    selected = select_round(records)
    decision = overall_decision(records, s.rounds, stop)
    analysis = convergence_analysis(records, selected, decision, s.regression_tolerance, s.convergence_epsilon)
    perf["total_seconds"] = time.perf_counter() - t_start
    return IterateResult(rounds=records, selected_round=selected, decision=decision, analysis=analysis,
                         chains=chains, pairs=pairs_by_round, settings=s, perf=perf,
                         quarantined=screened_out + [row for k in sorted(quarantined_by_round)
                                                     for row in quarantined_by_round[k]],
                         n_screened_out=len(screened_out))


def _run_round(k: int, start: int, end: int, rdir: Path, fp: str, chains: dict[int, list[Path]],
               pairs_by_round: dict[int, list[dict]], quarantined_by_round: dict[int, list[dict]], previous: dict, *,
               sft_dir: Path, sft_hash: str, finetune: str, screened, judge, preference_config, eval_texts, pair_gate,
               dpo_params, s: IterateSettings, ctx: EvalContext, rounds_origin: str, build_preference_data,
               log) -> tuple[dict, dict]:
    timings: dict = {"round": k}
    lines, items = zip(*screened[start:end])
    reference_name = "sft" if s.reference == "initial" else f"round {k - 1} policy"
    record: dict = {"round": k, "reference": reference_name, "prompts": [lines[0], lines[-1]],
                    "n_prompts": len(items), "pairs": None, "dpo": None}
    t0 = time.perf_counter()
    policy = training_policy(sft_dir, chains[k - 1], s.reference, k, s.seed, s.dtype)
    config = dataclasses.replace(preference_config, min_pairs=s.min_pairs,
                                 seed=preference_config.seed + ROUND_SEED_STRIDE * k)
    result = build_preference_data(config, judge, model=policy.model, tokenizer=policy.tokenizer, items=list(items),
                                   heldout_items=(), eval_texts=eval_texts, items_origin=rounds_origin,
                                   item_locations=[f"{rounds_origin}:{line}" for line in lines], log=log)
    pair_metrics = result.metrics()
    pairs = list(result.pairs)
    pairs_by_round[k] = pairs
    quarantined_by_round[k] = list(result.quarantined)
    record["pairs"] = _pair_summary(pair_metrics)
    timings["pairs_seconds"] = time.perf_counter() - t0
    failures = pair_gate(pair_metrics)
    rdir.mkdir(parents=True, exist_ok=True)
    write_pairs(pairs, rdir / "pairs.parquet")

    if not failures:
        round_params = round_dpo_params(dpo_params, round_steps(s.max_steps, s.max_epochs, len(pairs), s.batch_size))
        t1 = time.perf_counter()
        with policy.as_reference() as ref:
            train_logps = compute_ref_logps(ref, policy.tokenizer, pairs, s.max_len, s.batch_size,
                                            desc=f"ref logps round {k}")
            held_logps = (ctx.heldout_sft_logps if s.reference == "initial" else
                          compute_ref_logps(ref, policy.tokenizer, ctx.heldout_pairs, s.max_len, s.batch_size,
                                            desc=f"ref logps heldout round {k}"))
        timings["ref_logps_seconds"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        try:
            dpo_result = train_dpo(policy.model, policy.tokenizer, pairs, train_logps, ctx.heldout_pairs, held_logps,
                                   ctx.kl_prompts, round_params, s.batch_size, s.seed + k, None,
                                   rdir / "dpo_checkpoint",
                                   reference=policy.reference, fingerprint=fp, max_len=s.max_len,
                                   kl_samples=s.kl_samples, kl_max_tokens=s.kl_max_tokens)
        except TrainingDiverged as err:
            dpo_result = None
            failures.append(f"training diverged: {err}")
        timings["train_seconds"] = time.perf_counter() - t2
        if dpo_result is not None:
            record["dpo"] = _dpo_summary(dpo_result.metrics)
            if not dpo_result.kl_target_met:
                failures.append(f"no DPO attempt met dpo.kl_target {round_params.kl_target:g} against the round's "
                                "reference")
            snapshot = save_snapshot(policy, rdir / "policy", sft_hash, k, s.reference, sft_dir)
            chains[k] = chain_for(chains, k, snapshot, finetune, s.reference)
            t3 = time.perf_counter()
            metrics, eval_timings = evaluate_policy(policy.model, policy.tokenizer, ctx, s, f"round {k}")
            timings.update(eval_timings, eval_seconds=time.perf_counter() - t3)
            record.update(metrics)
            kl = metrics.get("kl")
            if not _finite(kl) or kl > round_params.kl_target:
                failures.append(f"KL(policy || SFT) {kl if kl is None else f'{kl:.4g}'} > dpo.kl_target "
                                f"{round_params.kl_target:g}")
            if not _finite(metrics.get(PRIMARY)):
                failures.append(f"{PRIMARY} is not finite")
        shutil.rmtree(rdir / "dpo_checkpoint", ignore_errors=True)
    record["passed"] = not failures
    record["failures"] = failures
    record.update(decide_round(previous, record, s.regression_tolerance, s.convergence_epsilon))
    record = _clean(record)
    io.write_json(rdir / STATE_FILE, {"fingerprint": fp, "record": record, "quarantined": quarantined_by_round[k]})
    del policy
    return record, timings


def log_rounds(live: Any, rounds: Sequence[Mapping[str, Any]]) -> None:
    """dvclive curves across rounds (step = round): the measurements and the pairs of every round."""
    if live is None:
        return
    for record in rounds:
        live.step = int(record["round"])
        values = {key: record.get(key) for key in ("kl", "heldout_gap", "heldout_accuracy", "heldout_margin",
                                                   "task_accuracy", "benchmark_mean")}
        pairs = record.get("pairs") or {}
        values["n_pairs"] = pairs.get("n_pairs")
        values["pairs_avg_gap"] = pairs.get("avg_gap")
        train = ((record.get("dpo") or {}).get("train") or {})
        values["train_margin"] = train.get("rewards/margins")
        for key, value in values.items():
            if _finite(value):
                live.log_metric(key, float(value))
        live.next_step()


def render_iterate_report(metrics: Mapping[str, Any]) -> str:
    """reports/iterate.md: the rounds table, the decisions and the convergence analysis."""
    fmt = lambda v: "–" if not _finite(v) else f"{v:.4g}"  # noqa: E731
    lines = ["# Iterative training (Stage 6)", "",
             f"Decision: **{metrics['decision']}**; selected round **{metrics['selected_round']}** "
             f"(reference of that round: {metrics.get('selected_reference')}). KL(selected || SFT) "
             f"{fmt(metrics.get('selected_kl'))}, held-out gap {fmt(metrics.get('selected_heldout_gap'))}.", "",
             "| round | reference | pairs | pair gap | KL vs SFT | held-out gap | task accuracy | benchmark mean | "
             "passed | decision |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in metrics["rounds"]:
        pairs = r.get("pairs") or {}
        lines.append(f"| {r['round']} | {r.get('reference')} | {pairs.get('n_pairs', '–') if pairs else '–'} | "
                     f"{fmt(pairs.get('avg_gap')) if pairs else '–'} | {fmt(r.get('kl'))} | "
                     f"{fmt(r.get('heldout_gap'))} | "
                     f"{fmt(r.get('task_accuracy'))} | {fmt(r.get('benchmark_mean'))} | "
                     f"{'yes' if r.get('passed') else 'no'} | {r.get('decision')} |")
    lines += ["", "## Decisions", ""]
    for r in metrics["rounds"]:
        lines.append(f"- round {r['round']}: **{r.get('decision')}** — {'; '.join(r.get('reasons') or [])}")
    lines += ["", "## Convergence analysis", "", metrics["analysis"], "",
              "Rules: a round that fails a check or lets any of " + ", ".join(f"`{w}`" for w in WATCHED) +
              " drop by more than `iterate.regression_tolerance` is rolled back and the iteration stops; a change of "
              f"`{PRIMARY}` below `iterate.convergence_epsilon` stops it as converged. See docs/iterative-training.md.",
              ""]
    return "\n".join(lines)
