"""Production feedback to preference pairs: logged responses with a thumbs up/down or a rating, grouped per prompt,
best- vs worst-rated response, the gap from the ratings."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from dpoflow.data.pairs import RowError, make_pair
from dpoflow.data.reading import FeedbackLoad, convert_records, in_input_order, open_input
from dpoflow.data.rows import (
    UnknownShape,
    as_object,
    key_list,
    present,
    prompt_messages,
    required_field,
    short_value,
    string_field,
    type_name,
)
from dpoflow.data.tasks import normalize_question

# Production feedback


THUMBS = {"up": 1.0, "down": 0.0, True: 1.0, False: 0.0}


def feedback_pairs(
    spec: str | os.PathLike,
    *,
    rating_scale: tuple[float, float] | None = None,
    task: str | None = None,
    split: str | None = None,
) -> FeedbackLoad:
    """Preference pairs from logged production feedback.

    Rows: ``{"prompt": str or messages ending with a user turn, "response": str, "rating": number}`` or with
    ``"thumbs"`` instead of ``rating``: "up"/"down" (any case), true/false, 1/0. Optional ``session_id`` (not used
    for pairing), ``task``/``category`` (the pair's task; else the `task` argument). A row with both uses `rating`.

    Scores in [0, 1]: thumbs up 1.0, down 0.0; a rating r becomes ``(r - low) / (high - low)`` with `rating_scale`
    = (low, high) if given (ratings outside it are quarantined as ``rating out of range``), else the lowest and
    highest rating observed in the input (all equal: 0.5).

    Rows are grouped by prompt: the messages with contents normalized by ``dpoflow.tasks.normalize_question``
    (NFKC, whitespace collapsed, case-folded), so a string prompt and one user message group together. Within a
    prompt, responses are compared after stripping whitespace; **duplicates are averaged**: a response logged
    several times scores the mean of its scores (`n_duplicate_responses` counts the repeats). Each prompt gives at
    most one pair: the best-scored response (the first logged among equals) as chosen, the worst (likewise) as
    rejected, their scores as the pair's scores (so the gap is their difference). A prompt with one distinct
    response or with all scores equal gives no pair: its rows are valid, counted in `n_unpaired_prompts`, not
    quarantined. The pair's prompt is the first logged row's; ``source`` is ``feedback:<location>`` of the chosen
    response's first row.
    """
    if rating_scale is not None:
        low, high = (float(x) for x in rating_scale)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"rating_scale must be (low, high) with low < high, got {rating_scale!r}")
    source = open_input(spec, split)

    def convert(value: Any, location: str) -> dict:
        row = as_object(value)
        if not any(key in row for key in ("response", "rating", "thumbs")):
            raise UnknownShape(
                "row",
                f"unknown row format: expected `prompt`, `response` and `rating` or `thumbs`; got keys {key_list(row)}",
            )
        prompt = prompt_messages(required_field(row, "prompt"), "prompt")
        response = string_field(row, "response")
        if not response.strip():
            raise RowError("response", "empty string")
        if present(row, "rating"):
            rating = row["rating"]
            if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
                raise RowError("rating", f"wrong type: expected a finite number, got {type_name(rating)}")
            if rating_scale is not None and not low <= rating <= high:
                raise RowError("rating", f"rating out of range: {rating:g} is outside {low:g}-{high:g}")
            kind, score = "rating", float(rating)
        elif present(row, "thumbs"):
            kind, score = "thumbs", _thumbs(row["thumbs"])
        else:
            raise RowError("rating", "missing field: expected `rating` (a number) or `thumbs` (up/down)")
        category = row.get("task") if isinstance(row.get("task"), str) else row.get("category")
        return {
            "prompt": prompt,
            "response": response,
            "kind": kind,
            "score": score,
            "task": category if isinstance(category, str) else task,
        }

    accepted, quarantined = convert_records(source, convert, "a feedback row (`prompt`, `response`, `rating`/`thumbs`)")
    ratings = [r["score"] for _, r in accepted if r["kind"] == "rating"]
    scale = (low, high) if rating_scale is not None else ((min(ratings), max(ratings)) if ratings else None)

    groups: dict[str, dict] = {}
    n_duplicates = 0
    for location, row in accepted:
        score = row["score"]
        if row["kind"] == "rating":
            score = 0.5 if scale[1] == scale[0] else (score - scale[0]) / (scale[1] - scale[0])
        key = json.dumps([[m["role"], normalize_question(m["content"])] for m in row["prompt"]])
        group = groups.setdefault(key, {"prompt": row["prompt"], "task": row["task"], "responses": {}})
        text = row["response"].strip()
        entry = group["responses"].get(text)
        if entry is None:
            group["responses"][text] = {"response": row["response"], "scores": [score], "location": location}
        else:
            n_duplicates += 1
            entry["scores"].append(score)

    pairs, locations, unpaired = [], [], 0
    for group in groups.values():
        entries = [(sum(e["scores"]) / len(e["scores"]), e) for e in group["responses"].values()]
        best = max(entries, key=lambda item: item[0])  # max/min return the first among equals
        worst = min(entries, key=lambda item: item[0])
        if len(entries) < 2 or best[0] == worst[0]:
            unpaired += 1
            continue
        (score_chosen, chosen), (score_rejected, rejected) = best, worst
        pairs.append(
            make_pair(
                group["prompt"],
                chosen["response"],
                rejected["response"],
                score_chosen,
                score_rejected,
                task=group["task"],
                source=f"feedback:{chosen['location']}",
            )
        )
        locations.append(chosen["location"])
    return FeedbackLoad(
        pairs=pairs,
        quarantined=in_input_order(quarantined),
        n_input=len(source.rows),
        n_accepted=len(accepted),
        n_prompts=len(groups),
        n_unpaired_prompts=unpaired,
        n_duplicate_responses=n_duplicates,
        rating_scale=scale,
        fingerprint=source.fingerprint,
        origin=source.origin,
        locations=locations,
    )


def _thumbs(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in THUMBS:
        return THUMBS[value.strip().lower()]
    if isinstance(value, bool):
        return THUMBS[value]
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise RowError("thumbs", f"wrong value: expected up/down, true/false or 1/0, got {short_value(value)}")


# --------------------------------------------------------------------------------------------------
