"""Human preference labels as annotation tools export them: Argilla (1.x and 2.x) and Label Studio's pairwise
comparison, to canonical pairs. Ties, skips and unresolved disagreements are quarantined with their reason."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from dpoflow.data.pairs import RowError, make_pair
from dpoflow.data.reading import PairLoad, convert_records, in_input_order, open_input
from dpoflow.data.rows import UnknownShape, as_object, key_list, prompt_messages, response_text, short_value, type_name

# 3a. Argilla preference exports


ARGILLA_PROMPT_FIELDS = ("prompt", "instruction", "input", "question")
ARGILLA_TIE_LABELS = ("tie", "equal", "same", "both", "neither", "none")
_ARGILLA_META = frozenset(
    {
        "id",
        "status",
        "_server_id",
        "inserted_at",
        "updated_at",
        "external_id",
        "metadata",
        "score",
        "vectors",
        "suggestions",
        "responses",
        "fields",
        "task",
        "category",
    }
)


def load_argilla(
    spec: str | os.PathLike,
    *,
    question: str | None = None,
    prompt_field: str | None = None,
    response_fields: Sequence[str] | None = None,
    task: str | None = None,
    split: str | None = None,
) -> PairLoad:
    """Preference pairs from an Argilla export of a preference dataset (fields: a prompt and two or more responses;
    a ranking question, or a label question naming the better response).

    Shapes read, per row (any file type of the module docstring, a saved folder or a hub name):

    * **Argilla 2.x flat** (``dataset.records.to_list(flatten=True)``, ``records.to_datasets()``, the data files of
      ``Dataset.to_hub``): fields as top-level columns, and for question ``q`` the columns ``q.responses`` (one value
      per annotator), ``q.responses.users`` and ``q.responses.status``::

        {"id": "r1", "status": "completed", "prompt": "Name a prime.", "response1": "7", "response2": "8",
         "preference.responses": [["response1", "response2"], ["response1", "response2"]],
         "preference.responses.users": ["u1", "u2"], "preference.responses.status": ["submitted", "submitted"]}

    * **Argilla 2.x nested** (``records.to_list()`` / ``Record.to_dict()``)::

        {"id": "r1", "fields": {"prompt": ..., "response1": ..., "response2": ...},
         "responses": {"preference": [{"value": ["response2", "response1"], "user_id": "u1", "status": "submitted"}]}}

    * **Argilla 1.x** (``FeedbackDataset.format_as("datasets")`` / ``push_to_huggingface``): fields as columns, and
      ``q`` a list of ``{"user_id", "value", "status"}`` (or, read back through ``datasets``, a struct of lists).

    Response values: a ranking as a list of option names best first (2.x), as ``[{"value", "rank"}]`` or
    ``{"value": [...], "rank": [...]}`` (1.x, equal ranks allowed); or a label naming the preferred response field
    (two response fields only; a label in ARGILLA_TIE_LABELS is a tie vote). Option names must be field names.
    Only responses with status ``submitted`` (or none) count; ``discarded`` and ``draft`` ones are ignored.

    Several annotators: each option's mean rank over the annotators who ranked it; chosen = best mean, rejected =
    worst mean (for two responses that is the majority vote). A tie at either end is quarantined (``tie`` when
    every annotator gave a tie, else ``conflict``); so are records with no counted response (``skipped`` when all
    were discarded, else ``missing annotation``). Pairs are label-only (no scores), ``source`` is
    ``argilla:<location>``, ``task`` is the record's ``task``/``category`` column (or metadata key), else the
    `task` argument.

    `question` (the question name), `prompt_field` (default: the first of ARGILLA_PROMPT_FIELDS present) and
    `response_fields` (for label questions; default: the string fields other than the prompt and Argilla's own
    columns, which must be exactly two) override the detection.
    """

    def convert(value: Any, location: str) -> tuple[dict, str]:
        row = as_object(value)
        fields, questions = _argilla_record(row)
        name = _argilla_question(questions, fields, question)
        prompt_name = prompt_field or next((f for f in ARGILLA_PROMPT_FIELDS if f in fields), None)
        if prompt_name is None or fields.get(prompt_name) is None:
            raise RowError(
                prompt_field or "prompt",
                "missing field"
                + ("" if prompt_field else f" (none of {', '.join(ARGILLA_PROMPT_FIELDS)}; pass prompt_field=)"),
            )
        prompt = prompt_messages(fields[prompt_name], prompt_name)
        candidates = (
            list(response_fields)
            if response_fields
            else [k for k, v in fields.items() if k != prompt_name and isinstance(v, str) and k not in _ARGILLA_META]
        )
        ballots, n_discarded, n_draft = [], 0, 0
        for i, (vote, status) in enumerate(questions[name]):
            if status == "discarded":
                n_discarded += 1
            elif status not in (None, "submitted"):
                n_draft += 1
            else:
                ballots.append(_argilla_ranks(vote, fields, candidates, f"{name}[{i}]"))
        if not ballots:
            if n_discarded and not n_draft:
                raise RowError(name, f"skipped: every response ({n_discarded}) was discarded")
            reason = f"no submitted response ({n_draft} draft)" if n_draft else "no response"
            raise RowError(name, f"missing annotation: {reason}")
        chosen, rejected = _aggregate_ranks(ballots, name)
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        pair_task = next(
            (
                v
                for v in (row.get("task"), row.get("category"), meta.get("task"), meta.get("category"))
                if isinstance(v, str)
            ),
            task,
        )
        pair = _label_pair(prompt, fields, chosen, rejected, pair_task, f"argilla:{location}")
        return pair, location

    return _load_labels(spec, split, convert, "an Argilla record (fields plus a question's responses)")


def _argilla_record(row: dict) -> tuple[dict, dict[str, list[tuple[Any, str | None]]]]:
    """(fields, {question: [(value, status), ...]}) of a record in any of the three export shapes."""
    if isinstance(row.get("fields"), dict) and isinstance(row.get("responses"), dict):  # 2.x nested
        questions = {}
        for name, responses in row["responses"].items():
            if responses is None:
                questions[name] = []
                continue
            if not isinstance(responses, list):
                raise RowError(f"responses.{name}", f"wrong type: expected a list, got {type_name(responses)}")
            questions[name] = [_vote_entry(r, f"responses.{name}[{i}]") for i, r in enumerate(responses)]
        return row["fields"], questions
    flat = [k[: -len(".responses")] for k in row if k.endswith(".responses")]
    if flat:  # 2.x flat
        questions = {}
        for name in flat:
            values = row[f"{name}.responses"] or []
            statuses = row.get(f"{name}.responses.status") or []
            if not isinstance(values, list) or not isinstance(statuses, list):
                raise RowError(f"{name}.responses", "wrong type: expected lists of responses and statuses")
            if statuses and len(statuses) != len(values):
                raise RowError(
                    f"{name}.responses.status", f"wrong type: {len(statuses)} statuses for {len(values)} responses"
                )
            questions[name] = [(v, statuses[i] if statuses else None) for i, v in enumerate(values)]
        return {k: v for k, v in row.items() if "." not in k}, questions
    questions = {}
    for name, value in row.items():  # 1.x: a list of {user_id, value, status}, or that as a struct of lists
        if isinstance(value, dict) and isinstance(value.get("value"), list) and "status" in value:
            statuses = value.get("status") or [None] * len(value["value"])
            if not isinstance(statuses, list) or len(statuses) != len(value["value"]):
                raise RowError(f"{name}.status", "wrong type: expected one status per response")
            questions[name] = list(zip(value["value"], statuses, strict=True))
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, dict) and "value" in v and ("status" in v or "user_id" in v) for v in value)
        ):
            questions[name] = [(v["value"], v.get("status")) for v in value]
        elif isinstance(value, list) and not value and f"{name}-suggestion" in row:
            questions[name] = []  # 1.x writes `<question>-suggestion` beside every question column
    if not questions:
        raise UnknownShape(
            "row",
            f"unknown row format: no Argilla responses (`<question>.responses`, nested "
            f"`responses` or 1.x response lists); got keys {key_list(row)}",
        )
    return {
        k: v
        for k, v in row.items()
        if k not in questions and not k.endswith("-suggestion") and not k.endswith("-suggestion-metadata")
    }, questions


def _vote_entry(response: Any, where: str) -> tuple[Any, str | None]:
    if not isinstance(response, dict) or "value" not in response:
        raise RowError(where, f"wrong type: expected a {{value, user_id, status}} object, got {type_name(response)}")
    return response["value"], response.get("status")


def _argilla_question(questions: dict[str, list], fields: dict, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in questions:
            raise RowError(
                wanted,
                f"missing field: no responses to question {short_value(wanted)} (the record has "
                f"{', '.join(map(short_value, questions)) or 'none'})",
            )
        return wanted
    if len(questions) == 1:
        return next(iter(questions))

    def refers(value: Any) -> bool:
        if isinstance(value, str):
            return value in fields or value.strip().lower() in ARGILLA_TIE_LABELS
        if isinstance(value, dict):
            value = value.get("value")
        options = [v.get("value") if isinstance(v, dict) else v for v in value] if isinstance(value, list) else []
        return bool(options) and all(isinstance(o, str) and o in fields for o in options)

    ranked = [name for name, votes in questions.items() if any(refers(v) for v, _ in votes)]
    if len(ranked) == 1:
        return ranked[0]
    names = ", ".join(map(short_value, questions))
    if not ranked and not any(questions.values()):
        raise RowError("responses", f"missing annotation: no response to any question ({names})")
    which = "several preference questions" if ranked else "no question's responses name a response field"
    raise RowError("responses", f"ambiguous: {which} ({names}); pass question=")


def _argilla_ranks(value: Any, fields: dict, candidates: list[str], where: str) -> dict[str, float]:
    """One annotator's ranks {field: rank}, 1 = best."""
    if isinstance(value, str):
        if len(candidates) != 2:
            raise RowError(
                where,
                f"wrong value: a label can only pair two response fields, the record has "
                f"{len(candidates)} ({', '.join(map(short_value, candidates))}); pass response_fields=",
            )
        if value.strip().lower() in ARGILLA_TIE_LABELS:
            return {candidates[0]: 1, candidates[1]: 1}
        if value not in candidates:
            raise RowError(
                where, f"wrong value: label {short_value(value)} names no response field ({', '.join(candidates)})"
            )
        return {value: 1, next(c for c in candidates if c != value): 2}
    if isinstance(value, dict) and isinstance(value.get("value"), list):  # 1.x read back: struct of lists
        ranks = value.get("rank")
        if not isinstance(ranks, list) or len(ranks) != len(value["value"]):
            raise RowError(where, "wrong value: expected one rank per ranked option")
        value = [{"value": v, "rank": r} for v, r in zip(value["value"], ranks, strict=True)]
    if not isinstance(value, list) or not value:
        raise RowError(where, f"wrong type: expected a ranking (list) or a label (string), got {type_name(value)}")
    ranks: dict[str, float] = {}
    for i, item in enumerate(value):
        option, rank = (item.get("value"), item.get("rank")) if isinstance(item, dict) else (item, i + 1)
        if not isinstance(option, str) or option not in fields:
            raise RowError(where, f"wrong value: ranked option {short_value(option)} is not a field of the record")
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
            raise RowError(where, f"wrong type: rank of {short_value(option)} must be a number, got {type_name(rank)}")
        if option in ranks:
            raise RowError(where, f"wrong value: option {short_value(option)} ranked twice")
        ranks[option] = float(rank)
    if len(ranks) < 2:
        raise RowError(where, "wrong value: a ranking needs at least two options")
    return ranks


def _aggregate_ranks(ballots: list[dict[str, float]], field: str) -> tuple[str, str]:
    """(chosen, rejected) by mean rank over the annotators who ranked each option; ties are RowErrors."""
    totals: dict[str, list[float]] = defaultdict(list)
    for ballot in ballots:
        for option, rank in ballot.items():
            totals[option].append(rank)
    means = {option: sum(r) / len(r) for option, r in totals.items()}
    best, worst = min(means.values()), max(means.values())
    top = [o for o, m in means.items() if m == best]
    bottom = [o for o, m in means.items() if m == worst]
    detail = ", ".join(f"{short_value(o)} {m:.2f}" for o, m in means.items())
    if best == worst or len(top) > 1 or len(bottom) > 1:
        if all(len(set(b.values())) == 1 for b in ballots):
            raise RowError(field, f"tie: the annotators ranked the responses equal ({len(ballots)} responses)")
        raise RowError(
            field,
            f"conflict: annotators disagree and no response wins (mean ranks {detail}; {len(ballots)} annotators)",
        )
    return top[0], bottom[0]


def _label_pair(prompt: list[dict], texts: dict, chosen_key: str, rejected_key: str, task: Any, source: str) -> dict:
    chosen = response_text(texts.get(chosen_key), chosen_key)
    rejected = response_text(texts.get(rejected_key), rejected_key)
    if chosen.strip() == rejected.strip():
        raise RowError(rejected_key, "chosen == rejected (identical responses)")
    return make_pair(prompt, chosen, rejected, None, None, task=task if isinstance(task, str) else None, source=source)


def _load_labels(
    spec: str | os.PathLike, split: str | None, convert: Callable[[Any, str], tuple[dict, str]], what: str
) -> PairLoad:
    """Run `convert(row, location) -> (pair, location)` over every row of `spec` (see reading.convert_records)."""
    source = open_input(spec, split)
    accepted, quarantined = convert_records(source, convert, what)
    return PairLoad(
        [p for _, (p, _) in accepted],
        in_input_order(quarantined),
        len(source.rows),
        [loc for loc, _ in accepted],
        fingerprint=source.fingerprint,
        origin=source.origin,
    )


# --------------------------------------------------------------------------------------------------

# 3b. Label Studio pairwise exports


LABEL_STUDIO_KEYS = (("answer1", "answer2"), ("text1", "text2"), ("response1", "response2"))


def load_label_studio(
    spec: str | os.PathLike,
    *,
    prompt_key: str = "prompt",
    left_key: str | None = None,
    right_key: str | None = None,
    from_name: str | None = None,
    task: str | None = None,
) -> PairLoad:
    """Preference pairs from a Label Studio JSON export of a pairwise project.

    The shape is Label Studio's "JSON" export (a list of tasks; also read: one task per JSON Lines line, or a
    single task object) of the "Human Preference collection for RLHF" template (``<Pairwise name="comparison"
    toName="answer1,answer2"/>``) or the "Pairwise Classification" one (``text1``/``text2``)::

        [{"id": 7, "data": {"prompt": "Name a prime.", "answer1": "7", "answer2": "8"},
          "annotations": [{"id": 1, "completed_by": 1, "was_cancelled": false,
                           "result": [{"from_name": "comparison", "to_name": "answer1,answer2", "type": "pairwise",
                                       "value": {"selected": "left"}}]}]}]

    ``selected: "left"`` prefers the left text (`left_key`, default the first of answer1/text1/response1 present in
    `data`), ``"right"`` the right one. `prompt_key` names the prompt (a string or a message list). Every annotation
    that is not cancelled (``was_cancelled``: skipped) and has a pairwise result (one with ``value.selected``; only
    `from_name`'s if given) is a vote; the majority wins. Quarantined: tasks with no annotations or no vote
    (``missing annotation``), only cancelled annotations (``skipped``), as many left as right votes (``conflict``),
    a `selected` other than left/right (``wrong value``). Predictions (pre-annotations) are ignored. Pairs are
    label-only, ``source`` is ``label_studio:<file>:<line>``, ``task`` is ``data.task`` or the `task` argument.
    """

    def convert(value: Any, location: str) -> tuple[dict, str]:
        row = as_object(value)
        data = row.get("data")
        if not isinstance(data, dict):
            raise UnknownShape(
                "data", f"unknown row format: not a Label Studio task (no `data` object); got keys {key_list(row)}"
            )
        keys = (
            (left_key, right_key)
            if left_key and right_key
            else next((pair for pair in LABEL_STUDIO_KEYS if pair[0] in data and pair[1] in data), None)
        )
        if keys is None:
            raise RowError(
                "data",
                "missing field: no answer1/answer2, text1/text2 or response1/response2 (pass left_key= and right_key=)",
            )
        if data.get(prompt_key) is None:
            raise RowError(f"data.{prompt_key}", "missing field")
        prompt = prompt_messages(data[prompt_key], f"data.{prompt_key}")
        annotations = row.get("annotations")
        if not annotations:
            raise RowError("annotations", "missing annotation: the task has no annotations")
        if not isinstance(annotations, list):
            raise RowError("annotations", f"wrong type: expected a list, got {type_name(annotations)}")
        votes = {"left": 0, "right": 0}
        n_cancelled = 0
        for i, annotation in enumerate(annotations):
            if not isinstance(annotation, dict):
                raise RowError(f"annotations[{i}]", f"wrong type: expected an object, got {type_name(annotation)}")
            if annotation.get("was_cancelled"):
                n_cancelled += 1
                continue
            results = annotation.get("result") or []
            if not isinstance(results, list):
                raise RowError(f"annotations[{i}].result", f"wrong type: expected a list, got {type_name(results)}")
            selected = [
                r["value"]["selected"]
                for r in results
                if isinstance(r, dict)
                and isinstance(r.get("value"), dict)
                and "selected" in r["value"]
                and (from_name is None or r.get("from_name") == from_name)
            ]
            if not selected:
                continue
            choices = {c if isinstance(c, str) else short_value(c) for c in selected}
            if len(choices) > 1:
                raise RowError(
                    f"annotations[{i}].result", "ambiguous: several pairwise results disagree; pass from_name="
                )
            choice = selected[0]
            if not isinstance(choice, str) or choice not in votes:
                raise RowError(
                    f"annotations[{i}].result",
                    f"wrong value: selected must be 'left' or 'right', got {short_value(choice)}",
                )
            votes[choice] += 1
        if not votes["left"] and not votes["right"]:
            if n_cancelled == len(annotations):
                raise RowError("annotations", f"skipped: every annotation ({n_cancelled}) was cancelled")
            raise RowError("annotations", f"missing annotation: no pairwise choice in {len(annotations)} annotations")
        if votes["left"] == votes["right"]:
            raise RowError(
                "annotations", f"conflict: annotators disagree ({votes['left']} left vs {votes['right']} right)"
            )
        chosen, rejected = keys if votes["left"] > votes["right"] else keys[::-1]
        texts = {key: data.get(key) for key in keys}
        pair = _label_pair(
            prompt,
            {f"data.{k}": v for k, v in texts.items()},
            f"data.{chosen}",
            f"data.{rejected}",
            data.get("task") or task,
            f"label_studio:{location}",
        )
        return pair, location

    return _load_labels(spec, None, convert, "a Label Studio task (`data` plus `annotations`)")


# --------------------------------------------------------------------------------------------------
