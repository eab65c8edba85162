"""Collect preference pairs (Stages 2 and 6): sample K responses per prompt, judge them, build pairs, validate,
regenerate when weak; or, with imported labels, load, split and validate.

    result = collect_pairs(p.preference, judge, seed=p.seed, system_prompt=..., model=model, tokenizer=tokenizer,
                           items=prompt_items, heldout_items=heldout_items, eval_texts=eval_texts)

Flow (documented for users in docs/preference-data-generation.md, "Generation and judging"):

1. Pass 0 samples `samples_per_prompt` (K) responses for every training prompt and every held-out prompt with
   `dpoflow.modeling.generation.generate` at `temperature`, seed `seed`.
2. Per prompt, the responses are deduplicated (identical text after strip(); the first occurrence is kept) and
   empty ones dropped, then judged (dpoflow.data.judges) on [0, 1].
3. Pairs per prompt (`make_pairs`): `best_vs_worst` (default) pairs the highest-scored response with the lowest
   (the first in sample order among equals); if all scores are equal the prompt yields no pair. `all_pairs`
   pairs every two responses with different scores, the higher-scored one chosen (K(K-1)/2 pairs at most).
4. Reference answers (`reference_chosen`, off by default): a prompt whose pooled responses yield no pair and none
   of which reaches the judge's score of the task's reference answer (`tasks.sft_target`, the format SFT taught)
   gets one pair: the reference as chosen, the worst response (first in order among equals) as rejected, source
   `<judge>+reference`. Without it a prompt the model gets confidently wrong (all K samples wrong) never yields a
   pair, so DPO cannot move its greedy answer (docs/preference-data-generation.md, "Reference answers").
5. The training pairs are validated with `dpoflow.data.validation.validate_dpo_pairs`: token length against
   `max_seq_len` (chat-formatted prompt + response + eos, the batching convention), mislabeled rows, conflicts
   (`conflict_rule`), duplicates, and decontamination against every evaluation set (`collect_eval_texts`).
6. Regeneration: while avg_gap < min_gap or n_pairs < min_pairs after validation, and fewer than
   `max_extra_passes` extra passes ran, pass k (k = 1, 2, ...) samples K new responses for each prompt that has
   yielded no pair yet (training and held-out alike) at temperature `temperature + k * temperature_step` (rounded to
   6 decimals) with seed `seed + k`. A prompt's responses from all passes are pooled (deduplicated, re-judged
   together), so a correct answer found at a higher temperature pairs with a wrong one from any pass.
7. Held-out pairs are built the same way from the held-out prompts (same passes, temperatures, judge, pairing)
   and validated without decontamination (they ARE evaluation data; they are never trained on).

Quality metrics (`PreferenceResult.metrics()`) are deterministic for the same inputs and seed; timings and
throughput live in `PreferenceResult.perf` (-> reports/perf/preference_data.json).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dpoflow.data.judges import Judge
from dpoflow.data.pairing import (
    PromptState,
    dedupe_responses,
    make_pairs,
    reference_pairs,
    token_counter,
)
from dpoflow.data.preference_result import PassRecord, PreferenceResult
from dpoflow.data.prompts import prompt_of
from dpoflow.data.validation import PairValidation, validate_dpo_pairs
from dpoflow.modeling.generation import generate
from dpoflow.runtime.params import PreferenceParams

SCORE_BINS = 10
_PAIRS_LOCATION = re.compile(r"<pairs>:(\d+)")


def pass_temperature(pp: PreferenceParams, pass_index: int) -> float:
    """Temperature of pass k: temperature + k * temperature_step, rounded to 6 decimals."""
    return round(pp.temperature + pass_index * pp.temperature_step, 6)


def _relocate(text: str, locations: Sequence[str]) -> str:
    return _PAIRS_LOCATION.sub(lambda m: locations[int(m.group(1)) - 1], text)


def validate_pairs(
    pairs: list[dict],
    locations: Sequence[str],
    params: PreferenceParams,
    count_tokens: Callable[[str], int] | None,
    eval_texts: dict[str, list[str]] | None,
) -> PairValidation:
    """validate_dpo_pairs on in-memory canonical pairs, with `<pairs>:N` replaced by `locations[N-1]` in the
    quarantine rows, their reasons and the contamination list."""
    if len(pairs) != len(locations):
        raise ValueError(f"{len(pairs)} pairs but {len(locations)} locations")
    v = validate_dpo_pairs(
        pairs=pairs,
        gap_threshold=params.min_gap,
        min_pairs=params.min_pairs,
        eval_texts=eval_texts or None,
        ngram=params.decontamination_ngram,
        max_tokens=params.max_seq_len,
        count_tokens=count_tokens,
        conflict_rule=params.conflict_rule,
        fmt="canonical",
        score_scale=1,
    )
    for row in v.quarantined:
        row["location"] = _relocate(row["location"], locations)
        row["reason"] = _relocate(row["reason"], locations)
    for entry in v.contaminated:
        entry["location"] = _relocate(entry["location"], locations)
    return v


# ---------------------------------------------------------------------------------------------------------
# The stage's work


def _states(
    items: Sequence[Mapping[str, Any]],
    locations: Sequence[str] | None,
    origin: str,
    system_prompt: str | None,
    heldout: bool,
) -> list[PromptState]:
    if locations is not None and len(locations) != len(items):
        raise ValueError(f"{len(items)} items but {len(locations)} locations")
    return [
        PromptState(
            item=item,
            prompt=prompt_of(item, system_prompt),
            location=locations[i] if locations is not None else f"{origin}:{i + 1}",
            heldout=heldout,
        )
        for i, item in enumerate(items)
    ]


def _candidates(states: Sequence[PromptState]) -> tuple[list[dict], list[str]]:
    pairs, locations = [], []
    for st in states:
        pairs += st.pairs
        locations += [st.location] * len(st.pairs)
    return pairs, locations


def _needs_more(v: PairValidation, params: PreferenceParams) -> bool:
    return v.avg_gap < params.min_gap or v.n_pairs < params.min_pairs


def collect_pairs(
    params: PreferenceParams,
    judge: Judge,
    *,
    seed: int,
    system_prompt: str | None,
    tokenizer: Any,
    model: Any = None,
    items: Sequence[Mapping[str, Any]] = (),
    heldout_items: Sequence[Mapping[str, Any]] = (),
    eval_texts: dict[str, list[str]] | None = None,
    items_origin: str = "<prompts>",
    heldout_origin: str = "<heldout>",
    item_locations: Sequence[str] | None = None,
    heldout_locations: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PreferenceResult:
    """Generate, judge, pair and validate (see the module docstring); or, for the import judge, load and validate.

    `items` are the training prompts' task items, `heldout_items` the held-out ones (their pairs are the held-out
    pairs, never trained on). `eval_texts` (from `collect_eval_texts`) is what training pairs are
    decontaminated against. Locations in quarantine rows read `<origin>:<item number>` unless `item_locations`
    / `heldout_locations` give one per item.
    """
    log = log or (lambda message: None)
    if not judge.generates:
        return import_pairs(params, judge, seed=seed, tokenizer=tokenizer, eval_texts=eval_texts, log=log)
    if model is None:
        raise ValueError(f"judge {judge.name!r} scores sampled responses: a model is required")
    start_all = time.perf_counter()
    train = _states(items, item_locations, items_origin, system_prompt, heldout=False)
    held = _states(heldout_items, heldout_locations, heldout_origin, system_prompt, heldout=True)
    count_tokens = token_counter(tokenizer, [st.prompt for st in train + held])
    passes: list[PassRecord] = []
    perf_passes: list[dict] = []
    judge_seconds = validate_seconds = 0.0
    validation: PairValidation | None = None
    for k in range(params.max_extra_passes + 1):
        todo = [st for st in train + held if not st.pairs]
        if k > 0 and not [st for st in todo if not st.heldout]:
            break
        temperature, pass_seed = pass_temperature(params, k), seed + k
        n_train = sum(1 for st in todo if not st.heldout)
        log(
            f"pass {k}: {n_train} training + {len(todo) - n_train} held-out prompts x {params.samples_per_prompt} "
            f"samples at temperature {temperature:g}"
        )
        gens = generate(
            model,
            tokenizer,
            [st.prompt for st in todo],
            n_samples=params.samples_per_prompt,
            temperature=temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=pass_seed,
            batch_size=params.generation_batch_size,
            desc=f"preference pass {k}",
        )
        perf_passes.append(
            {
                "pass": k,
                "sequences": len(todo) * params.samples_per_prompt,
                "generated_tokens": gens.generated_tokens,
                "seconds": gens.seconds,
                "tokens_per_sec": gens.tokens_per_sec,
            }
        )
        t0 = time.perf_counter()
        for st, texts, ids, finished in zip(todo, gens.texts, gens.token_ids, gens.finished):
            st.raw_texts += texts
            st.response_tokens += [len(t) for t in ids]
            st.n_truncated_responses += sum(1 for f in finished if not f)
            st.passes.append(k)
            st.responses, st.n_duplicate_responses, st.n_empty_responses = dedupe_responses(st.raw_texts)
        scores = judge.score([st.item for st in todo], [st.prompt for st in todo], [st.responses for st in todo])
        new_with_pair = 0
        for st, s in zip(todo, scores):
            st.scores = [float(x) for x in s]
            st.pairs = make_pairs(st.prompt, st.responses, st.scores, params.pairing, st.task, judge.source)
        if params.reference_chosen:
            reference_pairs(todo, judge, judge.source)
        for st in todo:
            if st.pairs:
                st.first_pair_pass = k
                new_with_pair += 0 if st.heldout else 1
        judge_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        pairs, locations = _candidates(train)
        validation = validate_pairs(pairs, locations, params, count_tokens, eval_texts)
        validate_seconds += time.perf_counter() - t0
        passes.append(
            PassRecord(
                index=k,
                temperature=temperature,
                seed=pass_seed,
                prompts=n_train,
                heldout_prompts=len(todo) - n_train,
                responses=n_train * params.samples_per_prompt,
                new_prompts_with_pair=new_with_pair,
                candidate_pairs=len(pairs),
                pairs=validation.n_pairs,
                avg_gap=validation.avg_gap,
                decontamination=validation.decontamination,
            )
        )
        log(
            f"pass {k}: {new_with_pair} more prompts with a pair; {validation.n_pairs} valid pairs, "
            f"avg gap {validation.avg_gap:.3f}"
        )
        if not _needs_more(validation, params):
            break

    if validation is None:  # no prompts at all
        validation = validate_pairs([], [], params, count_tokens, eval_texts)
    t0 = time.perf_counter()
    held_pairs, held_locations = _candidates(held)
    held_validation = validate_pairs(held_pairs, held_locations, params, count_tokens, None) if held else None
    validate_seconds += time.perf_counter() - t0

    total_tokens = sum(p["generated_tokens"] for p in perf_passes)
    total_gen = sum(p["seconds"] for p in perf_passes)
    perf = {
        "generation_batch_size": params.generation_batch_size,
        "passes": perf_passes,
        "generated_tokens": total_tokens,
        "generation_seconds": total_gen,
        "tokens_per_sec": total_tokens / total_gen if total_gen else 0.0,
        "judge_seconds": judge_seconds,
        "validate_seconds": validate_seconds,
        "total_seconds": time.perf_counter() - start_all,
    }
    return PreferenceResult(
        judge=judge.name,
        pairing=params.pairing,
        pairs=validation.accepted,
        heldout_pairs=held_validation.accepted if held_validation else [],
        quarantined=validation.quarantined,
        heldout_quarantined=held_validation.quarantined if held_validation else [],
        validation=validation,
        heldout_validation=held_validation,
        n_input=validation.n_input,
        n_prompts=len(train),
        n_prompts_with_pair=sum(1 for st in train if st.pairs),
        heldout_prompts=len(held),
        heldout_input=held_validation.n_input if held_validation else 0,
        passes=passes,
        params=params,
        seed=seed,
        prompt_states=train + held,
        eval_set_sizes={k: len(v) for k, v in sorted((eval_texts or {}).items())},
        perf=perf,
        _count_tokens=count_tokens,
    )


def _heldout_prompt(prompt: list[dict], seed: int, fraction: float) -> bool:
    """Deterministic per-prompt split of imported pairs: all pairs of a prompt land on the same side."""
    digest = hashlib.sha1(f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode("utf-8", "backslashreplace"))
    return int(digest.hexdigest()[:8], 16) / 16**8 < fraction


def import_pairs(
    params: PreferenceParams,
    judge: Judge,
    *,
    seed: int,
    tokenizer: Any,
    eval_texts: dict[str, list[str]] | None,
    log: Callable[[str], None],
) -> PreferenceResult:
    """Judge import: load (rows that do not convert are quarantined), split off held-out prompts, validate."""
    start = time.perf_counter()
    loaded = judge.load()
    log(f"import: {loaded.n_input} rows, {len(loaded.pairs)} converted, {len(loaded.quarantined)} quarantined")
    count_tokens = token_counter(tokenizer, [p["prompt"] for p in loaded.pairs])
    train, train_loc, held, held_loc = [], [], [], []
    for pair, location in zip(loaded.pairs, loaded.locations):
        if _heldout_prompt(pair["prompt"], seed, params.import_heldout_fraction):
            held.append(pair)
            held_loc.append(location)
        else:
            train.append(pair)
            train_loc.append(location)
    validation = validate_pairs(train, train_loc, params, count_tokens, eval_texts)
    held_validation = validate_pairs(held, held_loc, params, count_tokens, None)
    quarantined = list(loaded.quarantined) + validation.quarantined  # rows that failed to load count as training
    prompts = {json.dumps(p["prompt"], sort_keys=True) for p in train}
    return PreferenceResult(
        judge=judge.name,
        pairing="import",
        pairs=validation.accepted,
        heldout_pairs=held_validation.accepted,
        quarantined=quarantined,
        heldout_quarantined=held_validation.quarantined,
        validation=validation,
        heldout_validation=held_validation,
        n_input=len(loaded.quarantined) + validation.n_input,
        n_prompts=len(prompts),
        n_prompts_with_pair=len({json.dumps(p["prompt"], sort_keys=True) for p in validation.accepted}),
        heldout_prompts=len({json.dumps(p["prompt"], sort_keys=True) for p in held}),
        heldout_input=held_validation.n_input,
        passes=[],
        params=params,
        seed=seed,
        eval_set_sizes={k: len(v) for k, v in sorted((eval_texts or {}).items())},
        perf={"total_seconds": time.perf_counter() - start},
        _count_tokens=count_tokens,
    )
