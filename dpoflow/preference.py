"""Stage 2 library: sample K responses per prompt, judge them, build pairs, validate, regenerate when weak.

    result = build_preference_data(config, judge, model=model, tokenizer=tokenizer,
                                   items=pref_items, heldout_items=heldout_items, eval_texts=eval_texts)
    write_outputs(result, root=Path("."))

Pure of DVC: the stage script (stages/preference_data.py) reads params, loads the model and calls these.

Flow (documented for users in docs/preference-data-generation.md, "Generation and judging"):

1. Pass 0 samples `samples_per_prompt` (K) responses for every training prompt and every held-out prompt with
   `dpoflow.generation.generate` at `temperature`, seed `seed`.
2. Per prompt, the responses are deduplicated (identical text after strip(); the first occurrence is kept) and
   empty ones dropped, then judged (dpoflow.judges) on [0, 1].
3. Pairs per prompt (`make_pairs`): `best_vs_worst` (default) pairs the highest-scored response with the lowest
   (the first in sample order among equals); if all scores are equal the prompt yields no pair. `all_pairs`
   pairs every two responses with different scores, the higher-scored one chosen (K(K-1)/2 pairs at most).
4. Reference answers (`reference_chosen`, off by default): a prompt whose pooled responses yield no pair and none
   of which reaches the judge's score of the task's reference answer (`tasks.sft_target`, the format SFT taught)
   gets one pair: the reference as chosen, the worst response (first in order among equals) as rejected, source
   `<judge>+reference`. Without it a prompt the model gets confidently wrong (all K samples wrong) never yields a
   pair, so DPO cannot move its greedy answer (docs/preference-data-generation.md, "Reference answers").
5. The training pairs are validated with `dpoflow.training_metrics.validate_dpo_pairs`: token length against
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
throughput live in `PreferenceResult.perf` (-> metrics/perf/preference_data.json).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dpoflow import io, tasks
from dpoflow.batching import encode_completion, encode_prompt
from dpoflow.data import make_pair, prompt_text, write_pairs, write_quarantine
from dpoflow.judges import Judge
from dpoflow.training_metrics import MIN_CONTAINED_TOKENS, PairValidation, normalize_text, validate_dpo_pairs

PAIRINGS = ("best_vs_worst", "all_pairs")
EVAL_SPLITS = ("heldout", "eval", "sft_val")
# Fields of an lm-eval data row that hold text the model is shown. Never answers, gold indices, targets or test code.
LM_EVAL_TEXT_FIELDS = ("question", "context", "passage", "text", "query")
MIN_TEMPLATE_ITEMS = 20  # a task's question template is inferred only from at least this many questions
SCORE_BINS = 10
_PAIRS_LOCATION = re.compile(r"<pairs>:(\d+)")


# ---------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class PreferenceConfig:
    """The preference.* params Stage 2 reads, plus the seed and the generation batch size."""

    samples_per_prompt: int = 4
    temperature: float = 0.9
    top_p: float = 1.0
    max_tokens: int = 24
    pairing: str = "best_vs_worst"
    max_seq_len: int = 128
    max_extra_passes: int = 2
    temperature_step: float = 0.1
    decontamination_ngram: int = 8
    conflict_rule: str = "majority"
    min_gap: float = 0.15          # regeneration target (the gate reads the same threshold)
    min_pairs: int = 1000          # regeneration target (the gate reads the same threshold)
    seed: int = 0
    system_prompt: str | None = tasks.SYSTEM_PROMPT
    generation_batch_size: int = 64
    import_heldout_fraction: float = 0.1  # judge import: share of prompts held out for data/heldout_pairs.parquet
    reference_chosen: bool = False  # no sample reaches the reference answer's score: pair the reference (step 4)

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 to compare responses, got {self.samples_per_prompt}")
        if not 0 <= self.import_heldout_fraction < 1:
            raise ValueError(f"import_heldout_fraction must be in [0, 1), got {self.import_heldout_fraction}")

    @classmethod
    def from_params(cls, p: Any, **overrides: Any) -> "PreferenceConfig":
        """From a dpoflow.params.Params; keys not (yet) in PreferenceParams fall back to the defaults here."""
        pp = p.preference
        values = {name: getattr(pp, name) for name in (
            "samples_per_prompt", "temperature", "top_p", "max_tokens", "pairing", "max_seq_len", "max_extra_passes",
            "temperature_step", "decontamination_ngram", "conflict_rule", "min_gap", "min_pairs")}
        for optional in ("generation_batch_size", "import_heldout_fraction", "reference_chosen"):
            if hasattr(pp, optional):
                values[optional] = getattr(pp, optional)
        values.update(seed=p.seed, system_prompt=p.data.system_prompt or None)
        values.update(overrides)
        return cls(**values)

    def temperature_of(self, pass_index: int) -> float:
        """Temperature of pass k: temperature + k * temperature_step, rounded to 6 decimals."""
        return round(self.temperature + pass_index * self.temperature_step, 6)

    def seed_of(self, pass_index: int) -> int:
        return self.seed + pass_index


# ---------------------------------------------------------------------------------------------------------
# Evaluation texts for decontamination


def question_templates(items: Iterable[Mapping[str, Any]],
                       min_items: int = MIN_TEMPLATE_ITEMS) -> dict[str, tuple[list[str], list[str]]]:
    """Per task: the normalized tokens every question starts with and ends with (its template).

    chain_sum asks "State the final answer to the following arithmetic problem: 14 + 75 =" for every problem: the
    template alone is longer than the 8-gram window, so matching whole questions would flag every chain_sum pair
    as contaminated by every chain_sum eval question. Inferred only from >= `min_items` questions of a task, so an
    operand shared by chance in a small sample is not mistaken for template.
    """
    by_task: dict[str, list[list[str]]] = defaultdict(list)
    for item in items:
        if isinstance(item.get("task"), str) and isinstance(item.get("question"), str):
            by_task[item["task"]].append(normalize_text(item["question"]).split())
    out = {}
    for task, seqs in sorted(by_task.items()):
        if len(seqs) < min_items:
            continue
        prefix = _common_prefix(seqs)
        shortest = min(len(s) for s in seqs)
        suffix = _common_prefix([s[::-1] for s in seqs])[::-1][: max(0, shortest - len(prefix))]
        if prefix or suffix:
            out[task] = (prefix, suffix)
    return out


def _common_prefix(seqs: list[list[str]]) -> list[str]:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for i in range(n):
            if s[i] != first[i]:
                n = i
                break
    return first[:n]


def strip_template(question: str, template: tuple[list[str], list[str]] | None) -> str:
    """The question without its task template (normalized tokens joined by spaces), or the question unchanged
    when it does not fit the template or too little (< MIN_CONTAINED_TOKENS tokens) would remain."""
    if not template:
        return question
    prefix, suffix = template
    tokens = normalize_text(question).split()
    if tokens[:len(prefix)] != prefix or (suffix and tokens[len(tokens) - len(suffix):] != suffix):
        return question
    middle = tokens[len(prefix):len(tokens) - len(suffix)]
    return " ".join(middle) if len(middle) >= MIN_CONTAINED_TOKENS else question


def lm_eval_row_texts(row: Mapping[str, Any]) -> list[str]:
    """The texts of one lm-eval data row that a model is shown.

    `question`/`context`/`passage`/`text`/`query` strings; `prompt` only when the row has no `question` (the local
    generation task's `prompt` is the question plus the shared instruction "Answer with only the final number.",
    whose words would match every pair); `choices` that are text (>= MIN_CONTAINED_TOKENS tokens): the cloze
    task's candidate sentences, not the numeric options of the multiple-choice task, which would match any pair
    whose response is that number. Never answers, gold indices, targets or HumanEval's hidden tests.
    """
    texts = [row[f] for f in LM_EVAL_TEXT_FIELDS if isinstance(row.get(f), str) and row[f].strip()]
    if "question" not in row and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        texts.append(row["prompt"])
    choices = row.get("choices")
    if isinstance(choices, list):
        texts += [c for c in choices if isinstance(c, str) and len(normalize_text(c).split()) >= MIN_CONTAINED_TOKENS]
    return texts


def _read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
            if isinstance(row, dict):
                rows.append(row)
    return rows


def collect_eval_texts(tasks_dir: str | Path, lm_eval_dir: str | Path | None = None,
                       splits: Sequence[str] = EVAL_SPLITS, template_items: Iterable[Mapping[str, Any]] = (),
                       strip_templates: bool = True) -> dict[str, list[str]]:
    """Texts of every evaluation set, by set name, for `validate_dpo_pairs(eval_texts=...)`.

    Sets: the task splits `splits` (their `question`s), named by split; and every `*.jsonl` data file of the local
    lm-eval tasks in `lm_eval_dir` (default `<tasks_dir>/lm_eval`), named `lm_eval/<file stem>`, with the fields of
    `lm_eval_row_texts`. Task questions lose their task template (`question_templates`, inferred from all task
    items seen here plus `template_items`, e.g. the preference prompts) unless `strip_templates` is False.
    """
    tasks_dir = Path(tasks_dir)
    lm_eval_dir = tasks_dir / "lm_eval" if lm_eval_dir is None else Path(lm_eval_dir)
    split_items = {}
    for name in splits:
        path = tasks_dir / f"{name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: evaluation split not found (run the prepare_data stage)")
        split_items[name] = tasks.read_split(path)
    lm_rows = {f"lm_eval/{path.stem}": _read_jsonl_rows(path)
               for path in sorted(lm_eval_dir.glob("*.jsonl"))} if lm_eval_dir.is_dir() else {}

    templates: dict[str, tuple[list[str], list[str]]] = {}
    if strip_templates:
        known = [it for items in split_items.values() for it in items]
        known += [row for rows in lm_rows.values() for row in rows]
        templates = question_templates(known + list(template_items))

    def question_text(row: Mapping[str, Any]) -> str:
        return strip_template(row["question"], templates.get(row.get("task")))

    out: dict[str, list[str]] = {}
    for name, items in split_items.items():
        out[name] = [question_text(item) for item in items]
    for name, rows in lm_rows.items():
        texts = []
        for row in rows:
            for text in lm_eval_row_texts(row):
                texts.append(question_text(row) if text is row.get("question") else text)
        out[name] = texts
    return out


# ---------------------------------------------------------------------------------------------------------
# Responses -> pairs


def dedupe_responses(texts: Sequence[str]) -> tuple[list[str], int, int]:
    """(kept texts, n_duplicates, n_empty): identical after strip() keeps the first; empty/blank ones dropped."""
    kept, seen, n_dup, n_empty = [], set(), 0, 0
    for text in texts:
        key = text.strip()
        if not key:
            n_empty += 1
        elif key in seen:
            n_dup += 1
        else:
            seen.add(key)
            kept.append(text)
    return kept, n_dup, n_empty


def make_pairs(prompt: list[dict], responses: Sequence[str], scores: Sequence[float], pairing: str = "best_vs_worst",
               task: str | None = None, source: str = "verifier") -> list[dict]:
    """Canonical pairs from one prompt's (deduplicated) scored responses.

    best_vs_worst: max vs min score, the first in order among equals; none when all scores are equal.
    all_pairs: every (i, j) with different scores, higher chosen; ordered by (i, j).
    """
    if len(responses) != len(scores):
        raise ValueError(f"{len(responses)} responses but {len(scores)} scores")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if len(responses) < 2:
        return []
    if pairing == "best_vs_worst":
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        worst = min(range(len(scores)), key=lambda i: (scores[i], i))
        if scores[best] == scores[worst]:
            return []
        return [make_pair(prompt, responses[best], responses[worst], scores[best], scores[worst], task, source)]
    out = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if scores[i] == scores[j]:
                continue
            hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
            out.append(make_pair(prompt, responses[hi], responses[lo], scores[hi], scores[lo], task, source))
    return out


def reference_pairs(states: Sequence["PromptState"], judge: Judge, source: str) -> list[int]:
    """Give each state without a pair whose responses all score below its reference answer one pair: the reference
    (`tasks.sft_target`) chosen, the worst response rejected. Returns the indices of the states that got one.

    The reference is judged together with the prompt's responses (one list), so judges whose scores depend on the
    other responses (the reward model centres on their mean) put all of them on one scale; the pair carries the
    scores of that call.
    """
    todo = [i for i, st in enumerate(states)
            if not st.pairs and st.responses and st.item is not None and str(st.item.get("answer", "")).strip()]
    if not todo:
        return []
    references = [tasks.sft_target(states[i].item) for i in todo]
    scored = judge.score([states[i].item for i in todo], [states[i].prompt for i in todo],
                         [list(states[i].responses) + [ref] for i, ref in zip(todo, references)])
    got = []
    for i, reference, scores in zip(todo, references, scored):
        st = states[i]
        *response_scores, ref_score = (float(x) for x in scores)
        if ref_score <= max(response_scores):
            continue  # a sample is as good as the reference: nothing to teach, or a pair exists already
        worst = min(range(len(response_scores)), key=lambda j: (response_scores[j], j))
        st.pairs = [make_pair(st.prompt, reference, st.responses[worst], ref_score, response_scores[worst],
                              st.task, f"{source}+reference")]
        got.append(i)
    return got


def token_counter(tokenizer: Any, prompts: Iterable[list[dict]]) -> Callable[[str], int]:
    """A `count_tokens` for validate_dpo_pairs that follows the batching convention exactly.

    validate_dpo_pairs measures `prompt_text(prompt)` and each response separately; this counter returns, for a
    known prompt's text, the length of its chat-formatted ids (`encode_prompt`, generation prompt included), and
    for any other text the completion length (`encode_completion`: text + eos). So the over-long check is
    prompt ids + completion ids > max_seq_len, the sequence the trainer would see.
    """
    prompt_lengths: dict[str, int] = {}
    for messages in prompts:
        text = prompt_text(messages)
        if text not in prompt_lengths:
            try:
                prompt_lengths[text] = len(encode_prompt(tokenizer, messages))
            except Exception:  # a template that rejects the conversation: count the raw text instead
                prompt_lengths[text] = len(tokenizer.encode(text, add_special_tokens=False))

    def count(text: str) -> int:
        if text in prompt_lengths:
            return prompt_lengths[text]
        return len(encode_completion(tokenizer, text))

    return count


# ---------------------------------------------------------------------------------------------------------
# State and result


@dataclass
class PromptState:
    """One prompt through the passes: its pooled responses and their scores."""

    item: Mapping[str, Any] | None
    prompt: list[dict]
    location: str
    heldout: bool = False
    raw_texts: list[str] = field(default_factory=list)      # every sample, all passes, in order
    responses: list[str] = field(default_factory=list)      # deduplicated, non-empty
    scores: list[float] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    n_duplicate_responses: int = 0
    n_empty_responses: int = 0
    n_truncated_responses: int = 0  # hit max_tokens without eos
    response_tokens: list[int] = field(default_factory=list)
    first_pair_pass: int | None = None
    passes: list[int] = field(default_factory=list)

    @property
    def task(self) -> str | None:
        return None if self.item is None else self.item.get("task")


@dataclass
class PassRecord:
    index: int
    temperature: float
    seed: int
    prompts: int               # training prompts sampled in this pass
    heldout_prompts: int
    responses: int             # training samples drawn in this pass (prompts * K)
    new_prompts_with_pair: int  # training prompts whose first pair came from this pass
    candidate_pairs: int       # training candidate pairs after this pass (all passes)
    pairs: int                 # validated training pairs after this pass
    avg_gap: float
    decontamination: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PreferenceResult:
    """What build_preference_data produced; `metrics()` for metrics/preference_data.json, `perf` for perf/."""

    judge: str
    pairing: str
    pairs: list[dict]
    heldout_pairs: list[dict]
    quarantined: list[dict]             # training quarantine rows (file locations)
    heldout_quarantined: list[dict]
    validation: PairValidation
    heldout_validation: PairValidation | None
    n_input: int                        # training rows in = n_pairs + n_quarantined
    n_prompts: int
    n_prompts_with_pair: int
    heldout_prompts: int
    heldout_input: int
    passes: list[PassRecord]
    config: PreferenceConfig
    prompt_states: list[PromptState] = field(default_factory=list, repr=False)
    eval_set_sizes: dict[str, int] = field(default_factory=dict)
    perf: dict = field(default_factory=dict)

    @property
    def all_quarantined(self) -> list[dict]:
        """Every removed row: training rows first, then held-out rows (their locations name heldout.jsonl)."""
        return self.quarantined + self.heldout_quarantined

    def score_distribution(self) -> dict:
        scores = [s for st in self.prompt_states if not st.heldout for s in st.scores]
        counts = [0] * SCORE_BINS
        for s in scores:
            counts[min(int(s * SCORE_BINS), SCORE_BINS - 1)] += 1
        return {"n": len(scores), "mean": _mean(scores), "zero": sum(1 for s in scores if s == 0.0),
                "one": sum(1 for s in scores if s == 1.0),
                "histogram": {"edges": [round(i / SCORE_BINS, 10) for i in range(SCORE_BINS + 1)], "counts": counts}}

    def metrics(self) -> dict:
        """Flat keys for the gate (avg_gap, n_pairs, decontamination) + detail; deterministic (no timings)."""
        v = self.validation
        train_states = [st for st in self.prompt_states if not st.heldout]
        tokens = (v.lengths.get("tokens") or {}) if v.lengths else {}
        length_flat = {f"{part}_tokens_{stat}": tokens[part][stat] for part in ("prompt", "chosen", "rejected")
                       if tokens.get(part) for stat in ("mean", "p95", "max")}
        diffs = _length_bias(self.pairs, self._count_tokens) if self.pairs else {}
        reasons = _reason_counts(self.quarantined)
        out: dict[str, Any] = {
            "judge": self.judge,
            "pairing": self.pairing,
            "avg_gap": v.avg_gap,
            "n_pairs": v.n_pairs,
            "decontamination": v.decontamination,
            "n_input": self.n_input,
            "n_quarantined": len(self.quarantined),
            "n_conflicts": v.n_conflicts,
            "n_conflict_rows": v.n_conflict_rows,
            "n_duplicates": v.n_duplicates,
            "n_mislabeled": v.n_mislabeled,
            "n_contaminated": v.n_contaminated,
            "n_label_only": v.n_label_only,
            "n_overlong": reasons.get("over-long", 0),
            "n_prompts": self.n_prompts,
            "n_prompts_with_pair": self.n_prompts_with_pair,
            "n_reference_pairs": sum(1 for p in self.pairs if (p.get("source") or "").endswith("+reference")),
            "usable_prompt_fraction": self.n_prompts_with_pair / self.n_prompts if self.n_prompts else 0.0,
            "passes": len(self.passes),
            "temperature_final": self.passes[-1].temperature if self.passes else None,
            "heldout_pairs": len(self.heldout_pairs),
            "heldout_input": self.heldout_input,
            "heldout_quarantined": len(self.heldout_quarantined),
            "heldout_prompts": self.heldout_prompts,
            "heldout_avg_gap": self.heldout_validation.avg_gap if self.heldout_validation else 0.0,
            **length_flat,
            **diffs,
            "quarantine_reasons": reasons,
            "gap_histogram": v.gap_histogram,
            "lengths": v.lengths,
            "eval_sets": self.eval_set_sizes,
            "contamination_by_set": dict(sorted(Counter(s for c in v.contaminated for s in c["eval_sets"]).items())),
            "regeneration_target": {"min_gap": self.config.min_gap, "min_pairs": self.config.min_pairs},
            "pass_log": {str(p.index): p.to_dict() for p in self.passes},
        }
        if train_states:
            n_samples = sum(len(st.raw_texts) for st in train_states)
            out.update({
                "samples_per_prompt": self.config.samples_per_prompt,
                "n_responses": n_samples,
                "n_duplicate_responses": sum(st.n_duplicate_responses for st in train_states),
                "n_empty_responses": sum(st.n_empty_responses for st in train_states),
                "truncated_response_fraction": (sum(st.n_truncated_responses for st in train_states) / n_samples
                                                if n_samples else 0.0),
                "response_tokens_mean": _mean([t for st in train_states for t in st.response_tokens]),
                "judge_scores": self.score_distribution(),
            })
        return out

    _count_tokens: Callable[[str], int] | None = field(default=None, repr=False)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _length_bias(pairs: list[dict], count: Callable[[str], int] | None) -> dict:
    """Length bias of the pairs (DPO readily learns "longer wins"): share with a longer chosen, mean difference."""
    measure = count or len
    diffs = [measure(p["chosen"]) - measure(p["rejected"]) for p in pairs]
    unit = "tokens" if count else "chars"
    return {"chosen_longer_fraction": sum(1 for d in diffs if d > 0) / len(diffs),
            f"length_diff_{unit}_mean": _mean(diffs)}


def _reason_counts(rows: list[dict]) -> dict[str, int]:
    """Counts by the stable head of each reason ("over-long: prompt + chosen is 140 tokens" -> "over-long")."""
    return dict(sorted(Counter(re.split(r"[:(]", q["reason"], maxsplit=1)[0].strip() for q in rows).items()))


# ---------------------------------------------------------------------------------------------------------
# Validation with file locations


def _relocate(text: str, locations: Sequence[str]) -> str:
    return _PAIRS_LOCATION.sub(lambda m: locations[int(m.group(1)) - 1], text)


def validate_pairs(pairs: list[dict], locations: Sequence[str], config: PreferenceConfig,
                   count_tokens: Callable[[str], int] | None, eval_texts: dict[str, list[str]] | None,
                   ) -> PairValidation:
    """validate_dpo_pairs on in-memory canonical pairs, with `<pairs>:N` replaced by `locations[N-1]` in the
    quarantine rows, their reasons and the contamination list."""
    if len(pairs) != len(locations):
        raise ValueError(f"{len(pairs)} pairs but {len(locations)} locations")
    v = validate_dpo_pairs(
        pairs=pairs, gap_threshold=config.min_gap, min_pairs=config.min_pairs, eval_texts=eval_texts or None,
        ngram=config.decontamination_ngram, max_tokens=config.max_seq_len, count_tokens=count_tokens,
        conflict_rule=config.conflict_rule, fmt="canonical", score_scale=1)
    for row in v.quarantined:
        row["location"] = _relocate(row["location"], locations)
        row["reason"] = _relocate(row["reason"], locations)
    for entry in v.contaminated:
        entry["location"] = _relocate(entry["location"], locations)
    return v


# ---------------------------------------------------------------------------------------------------------
# The stage's work


def _states(items: Sequence[Mapping[str, Any]], locations: Sequence[str] | None, origin: str,
            system_prompt: str | None, heldout: bool) -> list[PromptState]:
    if locations is not None and len(locations) != len(items):
        raise ValueError(f"{len(items)} items but {len(locations)} locations")
    return [PromptState(item=item, prompt=tasks.item_prompt(item, system_prompt),
                        location=locations[i] if locations is not None else f"{origin}:{i + 1}", heldout=heldout)
            for i, item in enumerate(items)]


def _candidates(states: Sequence[PromptState]) -> tuple[list[dict], list[str]]:
    pairs, locations = [], []
    for st in states:
        pairs += st.pairs
        locations += [st.location] * len(st.pairs)
    return pairs, locations


def _needs_more(v: PairValidation, config: PreferenceConfig) -> bool:
    return v.avg_gap < config.min_gap or v.n_pairs < config.min_pairs


def build_preference_data(
    config: PreferenceConfig,
    judge: Judge,
    *,
    tokenizer: Any,
    model: Any = None,
    items: Sequence[Mapping[str, Any]] = (),
    heldout_items: Sequence[Mapping[str, Any]] = (),
    eval_texts: dict[str, list[str]] | None = None,
    items_origin: str = "data/tasks/pref_prompts.jsonl",
    heldout_origin: str = "data/tasks/heldout.jsonl",
    item_locations: Sequence[str] | None = None,
    heldout_locations: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PreferenceResult:
    """Generate, judge, pair and validate (see the module docstring); or, for the import judge, load and validate.

    `items` are the training prompts' task items, `heldout_items` the held-out ones (their pairs go to
    data/heldout_pairs.parquet). `eval_texts` (from `collect_eval_texts`) is what training pairs are
    decontaminated against. Locations in quarantine rows read `<origin>:<item number>` unless `item_locations`
    / `heldout_locations` give one per item.
    """
    log = log or (lambda message: None)
    if not judge.generates:
        return _import_pairs(config, judge, tokenizer, eval_texts, log)
    if model is None:
        raise ValueError(f"judge {judge.name!r} scores sampled responses: a model is required")
    from dpoflow.generation import generate  # MLX import only when generating

    start_all = time.perf_counter()
    train = _states(items, item_locations, items_origin, config.system_prompt, heldout=False)
    held = _states(heldout_items, heldout_locations, heldout_origin, config.system_prompt, heldout=True)
    count_tokens = token_counter(tokenizer, [st.prompt for st in train + held])
    passes: list[PassRecord] = []
    perf_passes: list[dict] = []
    judge_seconds = validate_seconds = 0.0
    validation: PairValidation | None = None
    for k in range(config.max_extra_passes + 1):
        todo = [st for st in train + held if not st.pairs]
        if k > 0 and not [st for st in todo if not st.heldout]:
            break
        temperature, seed = config.temperature_of(k), config.seed_of(k)
        n_train = sum(1 for st in todo if not st.heldout)
        log(f"pass {k}: {n_train} training + {len(todo) - n_train} held-out prompts x {config.samples_per_prompt} "
            f"samples at temperature {temperature:g}")
        gens = generate(model, tokenizer, [st.prompt for st in todo], n_samples=config.samples_per_prompt,
                        temperature=temperature, top_p=config.top_p, max_tokens=config.max_tokens, seed=seed,
                        batch_size=config.generation_batch_size, desc=f"preference pass {k}")
        perf_passes.append({"pass": k, "sequences": len(todo) * config.samples_per_prompt,
                            "generated_tokens": gens.generated_tokens, "seconds": gens.seconds,
                            "tokens_per_sec": gens.tokens_per_sec})
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
            st.pairs = make_pairs(st.prompt, st.responses, st.scores, config.pairing, st.task, judge.source)
        if config.reference_chosen:
            reference_pairs(todo, judge, judge.source)
        for st in todo:
            if st.pairs:
                st.first_pair_pass = k
                new_with_pair += 0 if st.heldout else 1
        judge_seconds += time.perf_counter() - t0

        t0 = time.perf_counter()
        pairs, locations = _candidates(train)
        validation = validate_pairs(pairs, locations, config, count_tokens, eval_texts)
        validate_seconds += time.perf_counter() - t0
        passes.append(PassRecord(index=k, temperature=temperature, seed=seed, prompts=n_train,
                                 heldout_prompts=len(todo) - n_train, responses=n_train * config.samples_per_prompt,
                                 new_prompts_with_pair=new_with_pair, candidate_pairs=len(pairs),
                                 pairs=validation.n_pairs, avg_gap=validation.avg_gap,
                                 decontamination=validation.decontamination))
        log(f"pass {k}: {new_with_pair} more prompts with a pair; {validation.n_pairs} valid pairs, "
            f"avg gap {validation.avg_gap:.3f}")
        if not _needs_more(validation, config):
            break

    if validation is None:  # no prompts at all
        validation = validate_pairs([], [], config, count_tokens, eval_texts)
    t0 = time.perf_counter()
    held_pairs, held_locations = _candidates(held)
    held_validation = validate_pairs(held_pairs, held_locations, config, count_tokens, None) if held else None
    validate_seconds += time.perf_counter() - t0

    total_tokens = sum(p["generated_tokens"] for p in perf_passes)
    total_gen = sum(p["seconds"] for p in perf_passes)
    perf = {"generation_batch_size": config.generation_batch_size, "passes": perf_passes,
            "generated_tokens": total_tokens, "generation_seconds": total_gen,
            "tokens_per_sec": total_tokens / total_gen if total_gen else 0.0,
            "judge_seconds": judge_seconds, "validate_seconds": validate_seconds,
            "total_seconds": time.perf_counter() - start_all}
    return PreferenceResult(
        judge=judge.name, pairing=config.pairing, pairs=validation.accepted,
        heldout_pairs=held_validation.accepted if held_validation else [],
        quarantined=validation.quarantined,
        heldout_quarantined=held_validation.quarantined if held_validation else [],
        validation=validation, heldout_validation=held_validation, n_input=validation.n_input,
        n_prompts=len(train), n_prompts_with_pair=sum(1 for st in train if st.pairs),
        heldout_prompts=len(held), heldout_input=held_validation.n_input if held_validation else 0,
        passes=passes, config=config, prompt_states=train + held,
        eval_set_sizes={k: len(v) for k, v in sorted((eval_texts or {}).items())}, perf=perf,
        _count_tokens=count_tokens)


def _heldout_prompt(prompt: list[dict], seed: int, fraction: float) -> bool:
    """Deterministic per-prompt split of imported pairs: all pairs of a prompt land on the same side."""
    digest = hashlib.sha1(f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode("utf-8", "backslashreplace"))
    return int(digest.hexdigest()[:8], 16) / 16 ** 8 < fraction


def _import_pairs(config: PreferenceConfig, judge: Judge, tokenizer: Any, eval_texts: dict[str, list[str]] | None,
                  log: Callable[[str], None]) -> PreferenceResult:
    """Judge import: load (rows that do not convert are quarantined), split off held-out prompts, validate."""
    start = time.perf_counter()
    loaded = judge.load()
    log(f"import: {loaded.n_input} rows, {len(loaded.pairs)} converted, {len(loaded.quarantined)} quarantined")
    count_tokens = token_counter(tokenizer, [p["prompt"] for p in loaded.pairs])
    train, train_loc, held, held_loc = [], [], [], []
    for pair, location in zip(loaded.pairs, loaded.locations):
        if _heldout_prompt(pair["prompt"], config.seed, config.import_heldout_fraction):
            held.append(pair)
            held_loc.append(location)
        else:
            train.append(pair)
            train_loc.append(location)
    validation = validate_pairs(train, train_loc, config, count_tokens, eval_texts)
    held_validation = validate_pairs(held, held_loc, config, count_tokens, None)
    quarantined = list(loaded.quarantined) + validation.quarantined  # rows that failed to load count as training
    prompts = {json.dumps(p["prompt"], sort_keys=True) for p in train}
    return PreferenceResult(
        judge=judge.name, pairing="import", pairs=validation.accepted, heldout_pairs=held_validation.accepted,
        quarantined=quarantined, heldout_quarantined=held_validation.quarantined, validation=validation,
        heldout_validation=held_validation, n_input=len(loaded.quarantined) + validation.n_input,
        n_prompts=len(prompts), n_prompts_with_pair=len({json.dumps(p["prompt"], sort_keys=True)
                                                         for p in validation.accepted}),
        heldout_prompts=len({json.dumps(p["prompt"], sort_keys=True) for p in held}),
        heldout_input=held_validation.n_input, passes=[], config=config,
        eval_set_sizes={k: len(v) for k, v in sorted((eval_texts or {}).items())},
        perf={"total_seconds": time.perf_counter() - start}, _count_tokens=count_tokens)


# ---------------------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class OutputPaths:
    pairs: Path = Path("data/pairs.parquet")
    pairs_jsonl: Path = Path("data/pairs.jsonl")
    heldout_pairs: Path = Path("data/heldout_pairs.parquet")
    quarantine: Path = Path("data/quarantine.jsonl")
    report: Path = Path("reports/preference_data.md")
    metrics: Path = Path("metrics/preference_data.json")
    perf: Path = Path("metrics/perf/preference_data.json")

    def under(self, root: str | Path) -> "OutputPaths":
        root = Path(root)
        return OutputPaths(**{k: root / v for k, v in self.__dict__.items()})


def write_outputs(result: PreferenceResult, root: str | Path = ".", paths: OutputPaths | None = None,
                  perf_extra: Mapping[str, Any] | None = None) -> OutputPaths:
    """Write every Stage 2 artifact atomically (dpoflow.io / dpoflow.data writers)."""
    paths = (paths or OutputPaths()).under(root)
    write_pairs(result.pairs, paths.pairs, paths.pairs_jsonl)
    write_pairs(result.heldout_pairs, paths.heldout_pairs)
    write_quarantine(result.all_quarantined, paths.quarantine)
    metrics = result.metrics()
    io.write_text(paths.report, render_report(result, metrics))
    io.write_json(paths.metrics, metrics)
    io.write_json(paths.perf, {**result.perf, **dict(perf_extra or {})})
    return paths


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _bar(count: int, top: int, width: int = 30) -> str:
    return "#" * (round(width * count / top) if top else 0)


def _histogram_table(hist: Mapping[str, Any], label: str) -> list[str]:
    edges, counts = hist["edges"], hist["counts"]
    top = max(counts, default=0)
    lines = [f"| {label} | count | |", "|---|---:|---|"]
    for i, c in enumerate(counts):
        right = "]" if i == len(counts) - 1 else ")"
        lines.append(f"| [{edges[i]:.1f}, {edges[i + 1]:.1f}{right} | {c} | `{_bar(c, top)}` |")
    return lines


def render_report(result: PreferenceResult, metrics: Mapping[str, Any] | None = None) -> str:
    """reports/preference_data.md: statistics of the data (deterministic: no timings)."""
    m = dict(metrics or result.metrics())
    v = result.validation
    lines = ["# Preference data (Stage 2)", "",
             f"Judge `{result.judge}`, pairing `{result.pairing}`. Training pairs: **{m['n_pairs']}** from "
             f"{m['n_prompts']} prompts (rows in {m['n_input']} = pairs {m['n_pairs']} + quarantined "
             f"{m['n_quarantined']}); held-out pairs: **{m['heldout_pairs']}** from {m['heldout_prompts']} prompts "
             f"(never trained on).", "",
             "| metric | value |", "|---|---|"]
    for key in ("avg_gap", "n_pairs", "decontamination", "n_prompts", "n_prompts_with_pair", "n_reference_pairs",
                "usable_prompt_fraction",
                "n_input", "n_quarantined", "n_conflicts", "n_duplicates", "n_mislabeled", "n_contaminated",
                "n_overlong", "passes", "temperature_final", "heldout_pairs", "heldout_quarantined", "heldout_avg_gap",
                "n_responses", "n_duplicate_responses", "n_empty_responses", "truncated_response_fraction",
                "response_tokens_mean", "chosen_longer_fraction", "length_diff_tokens_mean"):
        if key in m:
            lines.append(f"| {key} | {_fmt(m[key])} |")
    if result.passes:
        lines += ["", "## Generation passes", "",
                  "| pass | temperature | seed | prompts | held-out prompts | new prompts with a pair | "
                  "candidate pairs | valid pairs | avg gap |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in result.passes:
            lines.append(f"| {p.index} | {p.temperature:g} | {p.seed} | {p.prompts} | {p.heldout_prompts} | "
                         f"{p.new_prompts_with_pair} | {p.candidate_pairs} | {p.pairs} | {p.avg_gap:.4f} |")
        lines += ["", f"Regeneration target: avg_gap >= {result.config.min_gap:g} and n_pairs >= "
                      f"{result.config.min_pairs} (preference.min_gap / min_pairs); at most "
                      f"{result.config.max_extra_passes} extra passes."]
    lines += ["", "## Preference gap (score_chosen - score_rejected; label-only pairs count as 1.0)", ""]
    lines += _histogram_table(v.gap_histogram, "gap")
    if "judge_scores" in m:
        js = m["judge_scores"]
        lines += ["", f"## Judge score distribution ({js['n']} judged training responses, mean {js['mean']:.4f}, "
                      f"exactly 0: {js['zero']}, exactly 1: {js['one']})", ""]
        lines += _histogram_table(js["histogram"], "score")
    lines += ["", "## Lengths of the accepted pairs", ""]
    for unit in ("tokens", "chars"):
        stats = (v.lengths or {}).get(unit)
        if not stats:
            continue
        note = " (prompt: chat-formatted prompt ids; chosen/rejected: response ids + eos)" if unit == "tokens" else ""
        lines += [f"{unit}{note}:", "", "| part | mean | p50 | p95 | max |", "|---|---:|---:|---:|---:|"]
        for part, s in stats.items():
            lines.append(f"| {part} | {s['mean']:.1f} | {s['p50']:.1f} | {s['p95']:.1f} | {s['max']} |")
        lines.append("")
    lines += ["## Quarantine", "", f"{len(result.quarantined)} training rows and {len(result.heldout_quarantined)} "
              "held-out rows removed (data/quarantine.jsonl: location, field, reason, row).", ""]
    reasons = _reason_counts(result.quarantined)
    held_reasons = _reason_counts(result.heldout_quarantined)
    if reasons or held_reasons:
        lines += ["| reason | training | held-out |", "|---|---:|---:|"]
        for reason in sorted(set(reasons) | set(held_reasons)):
            lines.append(f"| {reason} | {reasons.get(reason, 0)} | {held_reasons.get(reason, 0)} |")
    lines += ["", "## Decontamination", ""]
    if v.decontamination_checked:
        lines += [f"{v.n_contaminated} training pairs overlap an evaluation set ({v.ngram}-gram or whole short text "
                  f"match); decontamination = {v.decontamination:.4f}.", "",
                  "| evaluation set | texts | contaminated pairs |", "|---|---:|---:|"]
        by_set = m.get("contamination_by_set", {})
        for name, size in result.eval_set_sizes.items():
            lines.append(f"| {name} | {size} | {by_set.get(name, 0)} |")
        if v.contaminated:
            lines += ["", "First contaminated pairs:", ""]
            lines += [f"- `{c['id']}` at {c['location']}: {', '.join(c['eval_sets'])}" for c in v.contaminated[:20]]
            if len(v.contaminated) > 20:
                lines.append(f"- ... and {len(v.contaminated) - 20} more (see data/quarantine.jsonl)")
    else:
        lines.append("No evaluation texts were given: decontamination was not checked.")
    if v.conflicts:
        lines += ["", "## Conflicts", "", f"{len(v.conflicts)} conflicts resolved with rule "
                  f"`{result.config.conflict_rule}`."]
    return "\n".join(lines) + "\n"
