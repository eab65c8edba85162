"""Conflicting preference labels within a prompt: opposite labels (A > B and B > A) and preference cycles
(A > B, B > C, C > A), resolved by preference.conflict_rule (majority | score | drop). The rules are documented in
docs/preference-data-generation.md."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class LabeledPair:
    """A canonical pair and where it came from (`<file>:<line>`)."""

    pair: dict
    location: str

    @property
    def gap(self) -> float:
        """score_chosen - score_rejected; a label-only pair counts as 1.0."""
        if self.pair["score_chosen"] is None:
            return 1.0
        return self.pair["score_chosen"] - self.pair["score_rejected"]


def resolve_conflicts(
    items: list[LabeledPair], rule: str
) -> tuple[list[LabeledPair], list[dict], list[tuple[LabeledPair, str]]]:
    """Resolve opposite labels and preference cycles within each prompt.

    Each row is a vote for the edge chosen -> rejected (responses compared after strip()).  An edge's
    weight is its number of votes (rule "majority") or its mean score gap (rule "score").  Opposite
    labels: the heavier direction stays, a tie drops both.  Cycles: within each strongly connected
    component the lightest edges go (all of them on a tie), repeated until no cycle is left.
    Rule "drop" drops every edge involved.  Returns (kept items in input order, conflicts, dropped).
    """
    by_prompt: dict[str, dict[tuple[str, str], list[LabeledPair]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        key = json.dumps(item.pair["prompt"])
        by_prompt[key][(item.pair["chosen"].strip(), item.pair["rejected"].strip())].append(item)

    def weight(votes: list[LabeledPair]) -> float:
        return len(votes) if rule == "majority" else sum(v.gap for v in votes) / len(votes)

    conflicts: list[dict] = []
    dropped: dict[int, str] = {}  # id(item) -> reason

    def drop(votes: list[LabeledPair], reason: str) -> list[str]:
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
                ids = drop(
                    losers,
                    f"conflict: opposite labels for the same prompt and responses (outvoted, "
                    f"{weight(losers):.4g} vs {weight(winners):.4g} {basis})",
                )
                resolution = f"kept the direction with more {basis}"
            conflicts.append(
                {
                    "kind": "opposite",
                    "prompt_id": prompt_id,
                    "n_rows": len(forward) + len(backward),
                    "removed_ids": ids,
                    "resolution": resolution,
                }
            )
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
                    ids += drop(
                        edges.pop(edge),
                        f"conflict: preference cycle among {len(component)} responses to the same prompt ({why})",
                    )
                conflicts.append(
                    {
                        "kind": "cycle",
                        "prompt_id": prompt_id,
                        "n_responses": len(component),
                        "n_rows": sum(len(v) for v in inside.values()),
                        "removed_ids": ids,
                        "resolution": f"dropped {why}",
                    }
                )

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
