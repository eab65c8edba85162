"""Weaknesses, found and targeted: which prompt categories a model does worst on, and prompts drawn toward them.

    cats = [category_of(row) for row in items]                       # task (+ difficulty) | category | length
    bd = breakdown(cats, [j["score_final"] for j in judgments])      # mean + 95% interval per category
    bd = judged_breakdown(items, judgments, "outcome")               # the same from Stage 7's judgments
    deltas = breakdown_deltas(before, after)                         # per category: after - before
    w = targeted_weights(bd, floor=0.05)                             # toward the weakest, every category kept
    picked = draw_targeted(round_items, w, n=300, seed=7, exclude=used_ids)   # positions into round_items
    summary = targeted_summary(before, after, w)                     # did the targeted categories move?
    ctx.choose_prompts = TargetedPrompts(per_round, breakdown_of, floor, seed)   # Stage 6's seam

**Category of a row** (`category_of`): an embedded task item is its `task`, plus its difficulty when the item
carries one (reasoning-gym's `metadata.difficulty`: a scalar level gives `task/<level>`; a dict of config ranges
gives `task/key=value,...` with the item's own value of every key whose range is not a single value, e.g.
`add_2term/num_digits=1`); else the row's `category` column (users' prompt rows, dpoflow.data.sources), else its
`task` column (pairs, imported rows); else a prompt-length bucket of the user turns' words (LENGTH_BUCKETS):
`length:short` (<= 16 words), `length:medium` (<= 64), `length:long` (more).

**Breakdown**: per category, n, the mean success score (a score in [0, 1] per prompt: the judge's score of the
response, or the win / tie / loss outcome 1 / 0.5 / 0) and an interval at `confidence`: the Wilson interval
(eval.statistics.wilson_interval, ties counted half) when every score is 0, 0.5 or 1, else a percentile bootstrap of
the mean (bootstrap_mean_interval, seeded per category). Categories are sorted by name: deterministic output.

**Weighting rule** (`targeted_weights`): w_c = ((1 - mean_c) + floor) / sum_c' ((1 - mean_c') + floor). A category
the model always fails gets 1 + floor, one it always passes gets `floor` (> 0: it never starves), and the weights
sum to 1. With floor f and C categories the smallest share is at least f / (C (1 + f)).

**Draw** (`draw_targeted`): n prompts without replacement from the rows not excluded. Allocation: largest remainder
of n * w_c (ties by name) over the categories that still have rows; a category that runs out keeps all it has and its
shortfall is re-allocated the same way among the rest, until n rows or no rows are left. Categories in the rows but
not in the weights are given the mean weight of the measured categories present (unmeasured: neither weak nor
strong); all-zero weights fall back to equal ones. Within a category the rows are a seeded sample (random.Random
seeded by seed and category). Returned: positions into `rows`, ascending (the rows' own order), the same for the
same inputs.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dpoflow.data.prompts import prompt_of
from dpoflow.eval.statistics import bootstrap_mean_interval, wilson_interval
from dpoflow.eval.win_rate import responses
from dpoflow.modeling.generation import DECODE_BATCH

CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
DEFAULT_FLOOR = 0.05
LENGTH_BUCKETS: tuple[tuple[int | None, str], ...] = ((16, "short"), (64, "medium"), (None, "long"))  # words
MEASURES = ("score_final", "score_baseline", "outcome")


# ---------------------------------------------------------------------------------------------------------
# Categories


def _user_words(row: Mapping[str, Any]) -> int:
    try:
        messages = prompt_of(row, None) if ("prompt" in row or "question" in row) else []
    except (KeyError, TypeError):
        messages = []
    return sum(len(str(m.get("content", "")).split()) for m in messages if m.get("role") == "user")


def length_bucket(words: int) -> str:
    """`length:<name>` of the first LENGTH_BUCKETS entry whose bound (inclusive) holds `words`."""
    return next(f"length:{name}" for bound, name in LENGTH_BUCKETS if bound is None or words <= bound)


def _difficulty(row: Mapping[str, Any]) -> str | None:
    meta = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    level = row.get("difficulty", meta.get("difficulty"))
    if level is None or isinstance(level, bool):
        return None
    if isinstance(level, (str, int, float)):
        return str(level)
    if isinstance(level, Mapping):
        parts = []
        for key in sorted(level):
            bounds = level[key]
            fixed = isinstance(bounds, (list, tuple)) and len(set(map(str, bounds))) <= 1
            if not fixed and isinstance(meta.get(key), (str, int, float)) and not isinstance(meta.get(key), bool):
                parts.append(f"{key}={meta[key]}")
        return ",".join(parts) or None
    return None


def category_of(row: Mapping[str, Any]) -> str:
    """The row's category (module docstring): task (+ difficulty) | `category` | `task` | a length bucket."""
    for key in ("task", "category") if "question" in row else ("category", "task"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            level = _difficulty(row)
            return f"{value.strip()}/{level}" if level else value.strip()
    return length_bucket(_user_words(row))


# ---------------------------------------------------------------------------------------------------------
# Breakdowns


def _check_scores(scores: Sequence[float]) -> list[float]:
    out = [float(s) for s in scores]
    bad = [s for s in out if not (math.isfinite(s) and 0.0 <= s <= 1.0)]
    if bad:
        raise ValueError(f"success scores must be finite and in [0, 1]; got {bad[0]!r}")
    return out


def _seed_for(seed: int, category: str) -> int:
    return zlib.crc32(f"{int(seed)}:{category}".encode())


def breakdown(
    categories: Sequence[str],
    scores: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> dict:
    """Per-category success: {"n", "mean", "confidence", "categories": {name: {"n", "mean", "ci_low", "ci_high",
    "interval"}}} (names sorted); `mean` is over every prompt (None without prompts). See the module docstring."""
    values = _check_scores(scores)
    if len(categories) != len(values):
        raise ValueError(f"{len(categories)} categories but {len(values)} scores")
    groups: dict[str, list[float]] = {}
    for cat, value in zip(categories, values):
        groups.setdefault(str(cat), []).append(value)
    out = {}
    for cat in sorted(groups):
        vals = groups[cat]
        if all(v in (0.0, 0.5, 1.0) for v in vals):
            low, high = wilson_interval(sum(vals), len(vals), confidence)
            kind = "wilson"
        else:
            low, high = bootstrap_mean_interval(vals, confidence, samples, _seed_for(seed, cat))
            kind = "bootstrap"
        out[cat] = {"n": len(vals), "mean": sum(vals) / len(vals), "ci_low": low, "ci_high": high, "interval": kind}
    return {
        "n": len(values),
        "mean": sum(values) / len(values) if values else None,
        "confidence": confidence,
        "categories": out,
    }


def judged_breakdown(
    items: Sequence[Mapping[str, Any]] | None,
    judgments: Sequence[Mapping[str, Any]],
    measure: str = "score_final",
    **kwargs: Any,
) -> dict:
    """`breakdown` of Stage 7's judgments (win_rate.pairwise_judgments rows): the category of judgment j is that
    of items[j["index"]] (the judged items), or of the judgment's own prompt when `items` is None (length
    buckets). measure: score_final (the final model's judged score), score_baseline (the SFT model's) or outcome
    (win 1 / tie 0.5 / loss 0)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
    cats = [category_of(items[int(j["index"])] if items is not None else j) for j in judgments]
    return {**breakdown(cats, [j[measure] for j in judgments], **kwargs), "measure": measure}


def breakdown_deltas(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict:
    """Per category of either breakdown: {"before", "after", "delta" (after - before; None when one side lacks the
    category), "n_before", "n_after", "moved"}: "up" / "down" when the two intervals do not overlap, "within
    noise" when they do, None when a side is missing."""
    b, a = before.get("categories") or {}, after.get("categories") or {}
    out = {}
    for cat in sorted(set(b) | set(a)):
        x, y = b.get(cat), a.get(cat)
        moved = None
        if x and y:
            moved = "up" if y["ci_low"] > x["ci_high"] else "down" if y["ci_high"] < x["ci_low"] else "within noise"
        out[cat] = {
            "before": x["mean"] if x else None,
            "after": y["mean"] if y else None,
            "delta": y["mean"] - x["mean"] if x and y else None,
            "n_before": x["n"] if x else 0,
            "n_after": y["n"] if y else 0,
            "moved": moved,
        }
    return out


# ---------------------------------------------------------------------------------------------------------
# Targeting


def targeted_weights(bd: Mapping[str, Any], floor: float = DEFAULT_FLOOR) -> dict[str, float]:
    """w_c = ((1 - mean_c) + floor), normalized to sum 1, over the breakdown's categories (module docstring).
    floor must be > 0 so no category starves."""
    if not (math.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be > 0 (so every category keeps a share), got {floor!r}")
    raw = {cat: (1.0 - float(c["mean"])) + floor for cat, c in (bd.get("categories") or {}).items()}
    total = sum(raw.values())
    return {cat: v / total for cat, v in sorted(raw.items())} if total > 0 else {}


def _largest_remainder(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    quotas = {c: n * w / total for c, w in weights.items()}
    alloc = {c: math.floor(q) for c, q in quotas.items()}
    order = sorted(weights, key=lambda c: (-(quotas[c] - alloc[c]), c))
    for c in order[: n - sum(alloc.values())]:
        alloc[c] += 1
    return alloc


def draw_targeted(
    rows: Sequence[Mapping[str, Any]],
    weights: Mapping[str, float],
    n: int,
    seed: int,
    exclude: Collection[str] = (),
) -> list[int]:
    """Positions (ascending) of n rows drawn by category weight, without replacement, skipping rows whose `id` is
    in `exclude` (prompts already used); fewer when fewer remain. Deterministic (module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad = [w for w in weights.values() if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"weights must be finite and >= 0; got {bad[0]!r}")
    excluded = set(exclude)
    pools: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row.get("id") is None or row.get("id") not in excluded:
            pools.setdefault(category_of(row), []).append(i)
    known = [w for c, w in weights.items() if c in pools]
    fill = sum(known) / len(known) if known else 1.0
    w = {c: float(weights.get(c, fill)) for c in pools}
    if not any(v > 0 for v in w.values()):
        w = dict.fromkeys(pools, 1.0)
    target = min(n, sum(len(p) for p in pools.values()))
    alloc = dict.fromkeys(pools, 0)
    while sum(alloc.values()) < target:
        open_ = {c: v for c, v in w.items() if alloc[c] < len(pools[c])}
        if not any(v > 0 for v in open_.values()):
            open_ = dict.fromkeys(open_, 1.0)
        for c, k in _largest_remainder(target - sum(alloc.values()), open_).items():
            alloc[c] += min(k, len(pools[c]) - alloc[c])
    picked = []
    for c in sorted(pools):
        if alloc[c]:
            picked += random.Random(f"dpoflow-targeted:{int(seed)}:{c}").sample(pools[c], alloc[c])
    return sorted(picked)


def targeted_summary(before: Mapping[str, Any], after: Mapping[str, Any], weights: Mapping[str, float]) -> dict:
    """Did the targeted categories move? Targeted = weight above the equal share 1 / C. Returns {"targeted":
    [names, heaviest first], "deltas": {name: breakdown_deltas row + "weight"}, "improved", "regressed" (names whose
    intervals separated up / down), "text": one sentence for a report}."""
    deltas = breakdown_deltas(before, after)
    share = 1.0 / len(weights) if weights else 0.0
    targeted = sorted((c for c, v in weights.items() if v > share + 1e-12), key=lambda c: (-weights[c], c))
    rows = {c: {**deltas.get(c, {}), "weight": weights[c]} for c in targeted}
    improved = [c for c in targeted if rows[c].get("moved") == "up"]
    regressed = [c for c in targeted if rows[c].get("moved") == "down"]

    def shown(c: str) -> str:
        d = rows[c]
        if d.get("delta") is None:
            return f"{c} (not measured on both sides)"
        return f"{c} {d['before']:.3f} -> {d['after']:.3f} ({d['delta']:+.3f}, {d['moved']})"

    text = (
        "No category was weighted above the equal share: nothing was targeted."
        if not targeted
        else f"Targeted {len(targeted)} of {len(weights)} categories: {'; '.join(shown(c) for c in targeted)}. "
        f"{len(improved)} improved beyond their intervals, {len(regressed)} fell."
    )
    return {"targeted": targeted, "deltas": rows, "improved": improved, "regressed": regressed, "text": text}


def greedy_responses(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None,
    max_tokens: int,
    batch_size: int = DECODE_BATCH,
    seed: int = 0,
) -> list[str]:
    """One greedy response per item (win_rate.responses), as Stage 7 generates them."""
    prompts = [prompt_of(item, system_prompt) for item in items]
    return responses(model, tokenizer, prompts, max_tokens, 0.0, seed, batch_size, "weakness breakdown")


def policy_breakdown(
    model: Any,
    tokenizer: Any,
    judge: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None,
    max_tokens: int,
    batch_size: int = DECODE_BATCH,
    seed: int = 0,
    baseline: Sequence[str] | None = None,
) -> dict:
    """A policy's breakdown on `items`: one greedy response per item scored by `judge`, grouped by category_of(item).
    A judge whose scores are relative (`judge.relative`: reward model, llm) scores each response against
    `baseline` (the SFT model's greedy response to the same item): the score is the policy's share of the pair,
    1/2 = as good as SFT. An absolute judge (verifier, a python function) scores each response alone."""
    prompts = [prompt_of(item, system_prompt) for item in items]
    texts = greedy_responses(
        model, tokenizer, items, system_prompt=system_prompt, max_tokens=max_tokens, batch_size=batch_size, seed=seed
    )
    if getattr(judge, "relative", False):
        if baseline is None or len(baseline) != len(texts):
            raise ValueError("a relative judge needs the baseline's response to every item")
        candidates = [[t, b] for t, b in zip(texts, baseline)]
    else:
        candidates = [[t] for t in texts]
    scores = judge.score(list(items), prompts, candidates) if items else []
    return breakdown([category_of(item) for item in items], [s[0] for s in scores], seed=seed)


# ---------------------------------------------------------------------------------------------------------
# Stage 6's seam: Rounds.choose_prompts


@dataclass
class TargetedPrompts:
    """A `Rounds.choose_prompts` that draws round k's prompts toward the categories round k-1's policy is weakest on.

    Called as (k, screened, chains, records) -> [(line, item)], for every round in order (resumed ones too, so the
    draw is rebuilt identically). Round k-1's breakdown is its record's "categories" (`Rounds.categorize`), or
    `breakdown_of(k - 1, chains[k - 1])` when given (None = no breakdown). With one, round k draws `per_round`
    prompts with `draw_targeted(weights = targeted_weights(breakdown, floor), seed = seed + k)` from the screened
    prompts no earlier round drew; without one it takes the first `per_round` of them, which is exactly the fixed
    slice (eval.rounds.round_slice). `history[k]` keeps the breakdown, weights and lines of round k."""

    per_round: int
    breakdown_of: Callable[[int, Any], Mapping[str, Any] | None] | None = None
    floor: float = DEFAULT_FLOOR
    seed: int = 0
    drawn: dict[int, list[int]] = field(default_factory=dict)
    history: dict[int, dict] = field(default_factory=dict)
    _breakdowns: dict[int, Mapping[str, Any] | None] = field(default_factory=dict, init=False, repr=False)

    def breakdown(
        self, k: int, chains: Mapping[int, Any], records: Sequence[Mapping[str, Any]]
    ) -> Mapping[str, Any] | None:
        if self.breakdown_of is None:
            return next((r.get("categories") for r in records if r.get("round") == k), None)
        if k not in self._breakdowns:
            self._breakdowns[k] = self.breakdown_of(k, chains[k]) if k in chains else None
        return self._breakdowns[k]

    def __call__(
        self,
        k: int,
        screened: Sequence[tuple[int, Mapping[str, Any]]],
        chains: Mapping[int, Any],
        records: Sequence[Mapping[str, Any]],
    ) -> list[tuple[int, Mapping[str, Any]]]:
        used = {line for r, lines in self.drawn.items() if r < k for line in lines}
        available = [(line, item) for line, item in screened if line not in used]
        bd = self.breakdown(k - 1, chains, records)
        weights = targeted_weights(bd, self.floor) if bd and bd.get("categories") else None
        if weights is None:
            chosen = list(available[: self.per_round])
        else:
            picked = draw_targeted([item for _, item in available], weights, self.per_round, self.seed + k)
            chosen = [available[i] for i in picked]
        self.drawn[k] = [line for line, _ in chosen]
        self.history[k] = {"round": k, "from_round": k - 1, "breakdown": bd, "weights": weights, "lines": self.drawn[k]}
        return chosen

    def summaries(self, final: Mapping[str, Any] | None = None) -> dict[int, dict]:
        """targeted_summary of every targeted round k: round k-1's breakdown (what it targeted) vs round k's (the
        next round's `from` breakdown, or `final` for the last one)."""
        out = {}
        for k, h in sorted(self.history.items()):
            after = self.history[k + 1]["breakdown"] if k + 1 in self.history else final
            if h["weights"] and after:
                out[k] = targeted_summary(h["breakdown"], after, h["weights"])
        return out
