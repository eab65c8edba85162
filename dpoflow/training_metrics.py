"""Data-quality gate for preference pairs: gap, decontamination, conflicts, duplicates, lengths.

    from dpoflow.training_metrics import validate_dpo_pairs
    metrics = validate_dpo_pairs(dpo_path=Path("preference_pairs.jsonl"), gap_threshold=3/20)

Processing order (every removal becomes a quarantine row with its reason, so that
n_input == n_pairs + n_quarantined always holds):

1. load and convert (dpoflow.data): format errors, empty strings, chosen == rejected, over-long rows;
2. mislabeled: score_chosen < score_rejected;
3. conflicts within a prompt: opposite labels (A>B and B>A), then preference cycles (A>B, B>C, C>A),
   resolved by `conflict_rule`;
4. exact duplicates (same prompt, chosen, rejected): the first is kept;
5. decontamination against `eval_texts` (the fraction is measured before the contaminated pairs go);
6. gap, histogram and length statistics on the accepted pairs.

The rules are documented in docs/preference-data-generation.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from dpoflow.data import (
    LoadResult, convert_rows, load_pairs, prompt_text, quarantine_row, write_quarantine,
)

CONFLICT_RULES = ("majority", "score", "drop")
DEFAULT_NGRAM = 8
MIN_CONTAINED_TOKENS = 3  # a short eval text with fewer tokens must equal a whole pair text
GAP_BINS = 10
_KEPT_PUNCTUATION = frozenset("-*/%")  # arithmetic operators survive normalization as tokens


# --------------------------------------------------------------------------------------------------
# Text normalization and n-grams (public: Stage 7 reuses them)


def normalize_text(text: str) -> str:
    """NFKC, lowercase, punctuation removed, symbols split off as tokens, whitespace collapsed.

    Unicode punctuation (category P*) becomes a space, except the arithmetic operators - * / %;
    those and symbols (+ = < > ^ $ ...) become tokens of their own, so "3+4" and "3 + 4" normalize
    alike while "3+4" and "3-4" stay different.
    """
    out = []
    for char in unicodedata.normalize("NFKC", text).lower():
        if char.isalnum():
            out.append(char)
        elif char.isspace():
            out.append(" ")
        elif unicodedata.category(char).startswith("P") and char not in _KEPT_PUNCTUATION:
            out.append(" ")
        else:
            out.append(f" {char} ")
    return " ".join("".join(out).split())


def ngram_set(text: str, n: int = DEFAULT_NGRAM) -> set[int]:
    """Stable 64-bit hashes of the word n-grams of `normalize_text(text)`.

    A text shorter than n tokens yields one hash, of its whole normalized text (the exact-match
    fallback); an empty text yields the empty set.
    """
    return _gram_hashes(normalize_text(text).split(), n)


def _gram_hashes(tokens: list[str], n: int) -> set[int]:
    if not tokens:
        return set()
    if len(tokens) <= n:
        return {_hash(" ".join(tokens))}
    return {_hash(" ".join(tokens[i:i + n])) for i in range(len(tokens) - n + 1)}


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8", "backslashreplace"), digest_size=8).digest(),
                          "little")


class EvalIndex:
    """Hashed n-grams of every eval set, plus the short eval texts matched whole.

    An eval text of at least n tokens contaminates a pair text sharing any of its n-grams; a shorter one
    (of k >= MIN_CONTAINED_TOKENS tokens) when its whole token sequence occurs in the pair text; one of
    fewer tokens only when it equals a whole pair text.
    """

    def __init__(self, eval_texts: dict[str, Iterable[str]], n: int):
        self.n = n
        self.long: dict[str, set[int]] = {}
        self.short: dict[str, dict[int, set[int]]] = {}  # eval set -> k -> whole-text hashes
        self.exact: dict[str, set[int]] = {}
        for name, texts in eval_texts.items():
            long, short, exact = set(), defaultdict(set), set()
            for text in texts:
                tokens = normalize_text(text).split()
                if len(tokens) >= n:
                    long |= _gram_hashes(tokens, n)
                elif len(tokens) >= MIN_CONTAINED_TOKENS:
                    short[len(tokens)].add(_hash(" ".join(tokens)))
                elif tokens:
                    exact.add(_hash(" ".join(tokens)))
            self.long[name], self.short[name], self.exact[name] = long, dict(short), exact
        self.short_lengths = sorted({k for by_k in self.short.values() for k in by_k})
        self._cache: dict[str, tuple[set[int], dict[int, set[int]], int | None]] = {}

    def _grams(self, text: str) -> tuple[set[int], dict[int, set[int]], int | None]:
        cached = self._cache.get(text)
        if cached is None:
            tokens = normalize_text(text).split()
            long = {_hash(" ".join(tokens[i:i + self.n])) for i in range(len(tokens) - self.n + 1)}
            short = {k: _windows(tokens, k) for k in self.short_lengths if k <= len(tokens)}
            whole = _hash(" ".join(tokens)) if tokens else None
            cached = self._cache[text] = (long, short, whole)
        return cached

    def matches(self, texts: list[tuple[str, str]]) -> dict[str, str]:
        """For each eval set that one of the (field, text) pairs overlaps: the first such field."""
        grams = [(name, self._grams(text)) for name, text in texts]
        hits = {}
        for eval_set in self.long:
            for field_name, (long, short, whole) in grams:
                if (not long.isdisjoint(self.long[eval_set])
                        or any(not short[k].isdisjoint(hashes) for k, hashes in self.short[eval_set].items()
                               if k in short)
                        or whole in self.exact[eval_set]):
                    hits[eval_set] = field_name
                    break
        return hits

    def hits(self, text: str) -> list[str]:
        """The eval sets that `text` overlaps."""
        return list(self.matches([("", text)]))


def _windows(tokens: list[str], k: int) -> set[int]:
    return {_hash(" ".join(tokens[i:i + k])) for i in range(len(tokens) - k + 1)}


# --------------------------------------------------------------------------------------------------
# Result


@dataclass
class PairValidation:
    """Metrics of one validation run. `accepted` and `quarantined` are left out of to_dict()."""

    n_input: int
    n_pairs: int
    n_quarantined: int
    avg_gap: float
    n_label_only: int
    gap_histogram: dict
    n_mislabeled: int
    n_duplicates: int
    n_conflicts: int
    n_conflict_rows: int
    conflicts: list[dict]
    decontamination: float
    decontamination_checked: bool
    ngram: int
    eval_sets: list[str]
    n_contaminated: int
    contaminated: list[dict]
    lengths: dict
    quarantine_reasons: dict[str, int]
    thresholds: dict
    passed: dict[str, bool]
    all_passed: bool
    accepted: list[dict] = field(default_factory=list, repr=False, metadata={"exclude": True})
    quarantined: list[dict] = field(default_factory=list, repr=False, metadata={"exclude": True})

    def to_dict(self) -> dict:
        """JSON-safe metrics (counts only for the accepted and quarantined rows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("exclude")}


# --------------------------------------------------------------------------------------------------
# Validation


@dataclass
class _Item:
    pair: dict
    location: str

    @property
    def gap(self) -> float:
        """score_chosen - score_rejected; a label-only pair counts as 1.0."""
        if self.pair["score_chosen"] is None:
            return 1.0
        return self.pair["score_chosen"] - self.pair["score_rejected"]


def validate_dpo_pairs(
    dpo_path: str | os.PathLike | None = None,
    pairs: list[dict] | None = None,
    gap_threshold: float = 0.15,
    min_pairs: int = 1000,
    decontamination_threshold: float = 0.9,
    eval_texts: dict[str, list[str]] | None = None,
    ngram: int = DEFAULT_NGRAM,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    conflict_rule: str = "majority",
    quarantine_path: str | os.PathLike | None = None,
    *,
    fmt: str = "auto",
    score_scale: float | None = None,
    max_chars: int | None = None,
) -> PairValidation:
    """Validate preference pairs from a file (JSONL or Parquet, any import format) or an in-memory list.

    Passing thresholds: avg_gap >= gap_threshold, n_pairs >= min_pairs,
    decontamination >= decontamination_threshold.
    """
    if (dpo_path is None) == (pairs is None):
        raise ValueError("pass exactly one of dpo_path and pairs")
    if conflict_rule not in CONFLICT_RULES:
        raise ValueError(f"conflict_rule must be one of {CONFLICT_RULES}, got {conflict_rule!r}")
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    if count_tokens is not None:
        count_tokens = _memoized(count_tokens)

    options = dict(fmt=fmt, score_scale=score_scale, max_chars=max_chars, max_tokens=max_tokens,
                   count_tokens=count_tokens)
    loaded: LoadResult = (load_pairs(dpo_path, **options) if dpo_path is not None
                          else convert_rows(pairs, "<pairs>", **options))
    quarantined = list(loaded.quarantined)
    items = [_Item(p, loc) for p, loc in zip(loaded.pairs, loaded.locations)]

    def remove(item: _Item, field_name: str, reason: str) -> None:
        quarantined.append(quarantine_row(item.location, field_name, reason, item.pair))

    # 2. mislabeled
    kept = []
    for item in items:
        if item.gap < 0:
            remove(item, "score_chosen", f"mislabeled: score_chosen {item.pair['score_chosen']:.4g} < "
                                         f"score_rejected {item.pair['score_rejected']:.4g}")
        else:
            kept.append(item)
    n_mislabeled = len(items) - len(kept)

    # 3. conflicts
    kept, conflicts, dropped = _resolve_conflicts(kept, conflict_rule)
    for item, reason in dropped:
        remove(item, "chosen", reason)

    # 4. duplicates
    first_seen: dict[str, str] = {}
    unique = []
    for item in kept:
        pid = item.pair["id"]
        if pid in first_seen:
            remove(item, "row", f"duplicate: same prompt, chosen and rejected as {first_seen[pid]}")
        else:
            first_seen[pid] = item.location
            unique.append(item)
    n_duplicates = len(kept) - len(unique)

    # 5. decontamination
    contaminated: list[dict] = []
    clean = unique
    if eval_texts:
        index = EvalIndex(eval_texts, ngram)
        clean = []
        for item in unique:
            texts = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(item.pair["prompt"])]
            texts += [("chosen", item.pair["chosen"]), ("rejected", item.pair["rejected"])]
            hits = index.matches(texts)
            if hits:
                contaminated.append({"id": item.pair["id"], "location": item.location,
                                     "eval_sets": list(hits), "fields": list(hits.values())})
                remove(item, next(iter(hits.values())), f"contaminated: {', '.join(hits)}")
            else:
                clean.append(item)
    decontamination = 1.0 - len(contaminated) / len(unique) if unique else 1.0

    # 6. statistics on the accepted pairs
    accepted = [item.pair for item in clean]
    gaps = [item.gap for item in clean]
    avg_gap = sum(gaps) / len(gaps) if gaps else 0.0
    n_pairs = len(accepted)
    if loaded.n_input != n_pairs + len(quarantined):
        raise AssertionError(f"row accounting broken: {loaded.n_input} != {n_pairs} + {len(quarantined)}")

    passed = {
        "gap": avg_gap >= gap_threshold,
        "pairs": n_pairs >= min_pairs,
        "decontamination": decontamination >= decontamination_threshold,
    }
    result = PairValidation(
        n_input=loaded.n_input,
        n_pairs=n_pairs,
        n_quarantined=len(quarantined),
        avg_gap=avg_gap,
        n_label_only=sum(1 for p in accepted if p["score_chosen"] is None),
        gap_histogram=_histogram(gaps),
        n_mislabeled=n_mislabeled,
        n_duplicates=n_duplicates,
        n_conflicts=len(conflicts),
        n_conflict_rows=len(dropped),
        conflicts=conflicts,
        decontamination=decontamination,
        decontamination_checked=bool(eval_texts),
        ngram=ngram,
        eval_sets=sorted(eval_texts or {}),
        n_contaminated=len(contaminated),
        contaminated=contaminated,
        lengths=_length_stats(accepted, count_tokens),
        quarantine_reasons=dict(sorted(Counter(_reason_kind(q["reason"]) for q in quarantined).items())),
        thresholds={"gap": gap_threshold, "pairs": min_pairs, "decontamination": decontamination_threshold},
        passed=passed,
        all_passed=all(passed.values()),
        accepted=accepted,
        quarantined=quarantined,
    )
    if quarantine_path is not None:
        write_quarantine(quarantined, quarantine_path)
    return result


# --------------------------------------------------------------------------------------------------
# Conflicts


def _resolve_conflicts(items: list[_Item], rule: str) -> tuple[list[_Item], list[dict], list[tuple[_Item, str]]]:
    """Resolve opposite labels and preference cycles within each prompt.

    Each row is a vote for the edge chosen -> rejected (responses compared after strip()).  An edge's
    weight is its number of votes (rule "majority") or its mean score gap (rule "score").  Opposite
    labels: the heavier direction stays, a tie drops both.  Cycles: within each strongly connected
    component the lightest edges go (all of them on a tie), repeated until no cycle is left.
    Rule "drop" drops every edge involved.  Returns (kept items in input order, conflicts, dropped).
    """
    by_prompt: dict[str, dict[tuple[str, str], list[_Item]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        key = json.dumps(item.pair["prompt"])
        by_prompt[key][(item.pair["chosen"].strip(), item.pair["rejected"].strip())].append(item)

    def weight(votes: list[_Item]) -> float:
        return len(votes) if rule == "majority" else sum(v.gap for v in votes) / len(votes)

    conflicts: list[dict] = []
    dropped: dict[int, str] = {}  # id(item) -> reason

    def drop(votes: list[_Item], reason: str) -> list[str]:
        for vote in votes:
            dropped[id(vote)] = reason
        return [vote.pair["id"] for vote in votes]

    for prompt_key, edges in by_prompt.items():
        prompt_id = hashlib.sha1(prompt_key.encode("utf-8", "backslashreplace")).hexdigest()[:16]
        # opposite labels
        for a, b in sorted(edges):
            if a >= b or (b, a) not in edges:
                continue
            forward, backward = edges[(a, b)], edges[(b, a)]
            w_forward, w_backward = weight(forward), weight(backward)
            basis = "votes" if rule == "majority" else "mean gap"
            if rule == "drop" or w_forward == w_backward:
                why = "rule drop" if rule == "drop" else f"tie, {w_forward:.4g} vs {w_backward:.4g} {basis}"
                ids = drop(forward + backward, f"conflict: opposite labels for the same prompt and responses ({why})")
                resolution = "dropped all"
                del edges[(a, b)], edges[(b, a)]
            else:
                loser = (b, a) if w_forward > w_backward else (a, b)
                losers, winners = edges.pop(loser), edges[loser[::-1]]
                ids = drop(losers, f"conflict: opposite labels for the same prompt and responses (outvoted, "
                                   f"{weight(losers):.4g} vs {weight(winners):.4g} {basis})")
                resolution = f"kept the direction with more {basis}"
            conflicts.append({"kind": "opposite", "prompt_id": prompt_id, "n_rows": len(forward) + len(backward),
                              "removed_ids": ids, "resolution": resolution})
        # cycles
        while True:
            components = [c for c in _strongly_connected(list(edges)) if len(c) > 1]
            if not components:
                break
            for component in components:
                inside = {e: v for e, v in edges.items() if e[0] in component and e[1] in component}
                weights = {e: weight(v) for e, v in inside.items()}
                lightest = min(weights.values())
                if rule == "drop" or all(w == lightest for w in weights.values()):
                    why = "rule drop" if rule == "drop" else "tie"
                    removed = list(inside)
                else:
                    why = "fewest votes" if rule == "majority" else "smallest mean gap"
                    removed = [e for e, w in weights.items() if w == lightest]
                ids = []
                for edge in removed:
                    ids += drop(edges.pop(edge), f"conflict: preference cycle among {len(component)} responses "
                                                 f"to the same prompt ({why})")
                conflicts.append({"kind": "cycle", "prompt_id": prompt_id, "n_responses": len(component),
                                  "n_rows": sum(len(v) for v in inside.values()), "removed_ids": ids,
                                  "resolution": f"dropped {why}"})

    kept = [item for item in items if id(item) not in dropped]
    removed_items = [(item, dropped[id(item)]) for item in items if id(item) in dropped]
    return kept, conflicts, removed_items


def _strongly_connected(edges: list[tuple[str, str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (a prompt may have many responses)."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        graph[a].append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


# --------------------------------------------------------------------------------------------------
# Statistics


def _histogram(gaps: list[float], bins: int = GAP_BINS) -> dict:
    """Counts of gaps in equal bins [lo, hi) over [0, 1]; a gap of exactly 1.0 falls in the last bin.

    A gap within 1e-9 of an edge counts as on the edge (0.6 - 0.4 is 0.19999999999999996 in floats).
    """
    counts = [0] * bins
    for gap in gaps:
        counts[min(max(int(gap * bins + 1e-9), 0), bins - 1)] += 1
    return {"edges": [round(i / bins, 10) for i in range(bins + 1)], "counts": counts}


def _summary(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    ordered = sorted(values)
    return {"mean": sum(ordered) / len(ordered), "p50": _percentile(ordered, 50),
            "p95": _percentile(ordered, 95), "max": ordered[-1]}


def _percentile(ordered: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _length_stats(pairs: list[dict], count_tokens: Callable[[str], int] | None) -> dict:
    texts = {
        "prompt": [prompt_text(p["prompt"]) for p in pairs],
        "chosen": [p["chosen"] for p in pairs],
        "rejected": [p["rejected"] for p in pairs],
    }
    stats: dict[str, Any] = {"chars": {k: _summary([len(t) for t in v]) for k, v in texts.items()}}
    stats["tokens"] = (None if count_tokens is None
                       else {k: _summary([count_tokens(t) for t in v]) for k, v in texts.items()})
    return stats


def _reason_kind(reason: str) -> str:
    """The stable head of a quarantine reason: "missing field (null)" -> "missing field"."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


def _memoized(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    cache: dict[str, int] = {}

    def counted(text: str) -> int:
        if text not in cache:
            cache[text] = int(count_tokens(text))
        return cache[text]

    return counted
