"""Win rate of the final model over the baseline (SFT) model, judged prompt by prompt, with a bootstrap interval.

* Responses: one per prompt and model, greedy (`temperature` 0) or sampled at `temperature` with the same seed for
  both models. DPO moves the policy's sampling distribution; greedy decoding shows only where its mode flipped.
  The gated win rate uses `evaluate.win_rate_temperature`; the other decoding is measured and reported beside it.
  The baseline's responses (`baseline_responses`, both decodings) are computed once by their own stage and reused
  while the SFT model and the prompts are unchanged; samples do not depend on the batch (per-sequence uniforms).
* Outcome of one prompt: 1 = the final model's response is judged better than the baseline's, 0 = worse,
  0.5 = tie (equal judge scores, or identical text). Win rate = mean outcome (ties count half).
* 95% interval: percentile bootstrap over prompts, `bootstrap_samples` resamples from a seeded generator; a
  resample of n outcomes is drawn as multinomial counts of (win, tie, loss), which is the same distribution as
  resampling prompts with replacement and makes the interval independent of the order of the judgments (so the
  human-sheet round trip reproduces it exactly). Alignment improved = the interval's lower bound > 0.5.
* Exact sign test on the non-tied outcomes (dpoflow.eval.significance): `sign_test_p`, two-sided, H0 a win and a
  loss equally likely; `p_greater`, one-sided, H1 wins more likely. Ties carry no direction and are dropped, as in
  the classical sign test (the bootstrap above counts them half). No randomness: the p-values depend only on the
  counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dpoflow.eval.significance import p_greater, sign_test
from dpoflow.modeling.generation import DECODE_BATCH, generate

CONFIDENCE = 0.95
OTHER_DECODING_TEMPERATURE = 1.0  # reported-only sampled win rate when the gated one is greedy: the policy itself


def outcome_of(score_final: float, score_baseline: float, same_text: bool = False) -> float:
    """1.0 final better, 0.0 baseline better, 0.5 tie (equal scores or identical responses)."""
    if same_text or score_final == score_baseline:
        return 0.5
    return 1.0 if score_final > score_baseline else 0.0


def win_rate(
    outcomes: Sequence[float], bootstrap_samples: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> dict:
    """Win rate (ties count half) and its percentile-bootstrap interval; see the module docstring.

    Returns {"win_rate", "ci_low", "ci_high", "n", "wins", "ties", "losses", "bootstrap_samples", "confidence",
    "seed", "sign_test_p", "p_greater"}; the rate and bounds are None when there are no outcomes (the p-values are
    then 1: no evidence)."""
    values = [float(o) for o in outcomes]
    bad = [v for v in values if v not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"outcomes must be 0, 0.5 or 1; got {bad[0]!r}")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(values)
    wins, ties = values.count(1.0), values.count(0.5)
    losses = n - wins - ties
    out = {
        "n": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "bootstrap_samples": int(bootstrap_samples),
        "confidence": confidence,
        "seed": int(seed),
        "sign_test_p": sign_test(wins, losses),
        "p_greater": p_greater(wins, losses),
    }
    if n == 0:
        return {**out, "win_rate": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, ties / n, losses / n], size=int(bootstrap_samples))
    rates = (counts[:, 0] + 0.5 * counts[:, 1]) / n
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(rates, [alpha, 1.0 - alpha])
    return {**out, "win_rate": (wins + 0.5 * ties) / n, "ci_low": float(low), "ci_high": float(high)}


def pairwise_judgments(
    judge: Any,
    items: Sequence[Mapping[str, Any] | None],
    prompts: Sequence[list[dict]],
    final_texts: Sequence[str],
    baseline_texts: Sequence[str],
) -> list[dict]:
    """Judge the final model's response against the baseline's, prompt by prompt, with the configured judge
    (verifier: tasks.score; reward_model: rewards, compared within the prompt). One dict per prompt:
    {"index", "id", "prompt", "final", "baseline", "score_final", "score_baseline", "outcome"}."""
    if not len(items) == len(prompts) == len(final_texts) == len(baseline_texts):
        raise ValueError("items, prompts, final_texts and baseline_texts must have the same length")
    if not getattr(judge, "generates", True):
        raise ValueError(
            "the win rate needs a scoring judge (verifier or reward_model); the import judge only "
            "provides labelled pairs: use the human evaluation sheet instead"
        )
    scores = (
        judge.score(list(items), [list(p) for p in prompts], [[f, b] for f, b in zip(final_texts, baseline_texts)])
        if prompts
        else []
    )
    out = []
    for i, (item, prompt, f, b, s) in enumerate(zip(items, prompts, final_texts, baseline_texts, scores)):
        out.append(
            {
                "index": i,
                "id": (item or {}).get("id", str(i)),
                "prompt": list(prompt),
                "final": f,
                "baseline": b,
                "score_final": float(s[0]),
                "score_baseline": float(s[1]),
                "outcome": outcome_of(float(s[0]), float(s[1]), f.strip() == b.strip()),
            }
        )
    return out


def responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict]],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = DECODE_BATCH,
    desc: str = "responses",
) -> list[str]:
    """One response per prompt: greedy when temperature is 0 (the model's mode), else one sample drawn with `seed`.
    Both are deterministic for the same model, prompts and seed."""

    if not prompts:
        return []
    gens = generate(
        model,
        tokenizer,
        [list(p) for p in prompts],
        n_samples=1,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        batch_size=batch_size,
        desc=desc,
    )
    return [texts[0] for texts in gens.texts]


def decoding_name(temperature: float) -> str:
    return "greedy" if temperature == 0 else f"sampled (temperature {temperature:g})"


def decodings(temperature: float) -> tuple[float, float]:
    """(gated, other): the win rate is gated at `temperature`; the other decoding (greedy, or sampled at
    OTHER_DECODING_TEMPERATURE when the gated one is greedy) is reported beside it."""
    return temperature, 0.0 if temperature > 0 else OTHER_DECODING_TEMPERATURE


def _item_id(item: Mapping[str, Any] | None, index: int) -> str:
    return str((item or {}).get("id", index))


def baseline_responses(
    model: Any,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any] | None],
    prompts: Sequence[list[dict]],
    max_tokens: int,
    temperature: float,
    seed: int,
) -> list[dict]:
    """The baseline model's responses to the win-rate prompts in both `decodings(temperature)`, one row per prompt
    and decoding: {"decoding", "temperature", "index", "id", "response"}."""
    rows = []
    for t in decodings(temperature):
        name = decoding_name(t)
        texts = responses(model, tokenizer, prompts, max_tokens, t, seed, DECODE_BATCH, f"SFT responses, {name}")
        rows += [
            {"decoding": name, "temperature": t, "index": i, "id": _item_id(item, i), "response": text}
            for i, (item, text) in enumerate(zip(items, texts))
        ]
    return rows


def baseline_texts_for(
    rows: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any] | None], temperature: float
) -> list[str]:
    """The baseline responses of one decoding in prompt order; ValueError when `rows` answer other prompts (made for
    another eval split or win_rate_prompts)."""
    by_index = {r["index"]: r for r in rows if r["temperature"] == temperature}
    ids = [_item_id(item, i) for i, item in enumerate(items)]
    found = [by_index[i]["id"] if i in by_index else None for i in range(len(ids))]
    if found != ids or len(by_index) != len(ids):
        missing = sum(1 for a, b in zip(found, ids) if a != b) + abs(len(by_index) - len(ids))
        raise ValueError(
            f"the baseline responses ({decoding_name(temperature)}) are for other prompts: {missing} of {len(ids)} "
            "differ (rerun the sft_responses stage)"
        )
    return [by_index[i]["response"] for i in range(len(ids))]


def head_to_head(
    final_model: Any,
    tokenizer: Any,
    judge: Any,
    items: Sequence[Mapping[str, Any]],
    prompts: Sequence[list[dict]],
    baseline: Sequence[str],
    max_tokens: int,
    temperature: float,
    seed: int,
    bootstrap_samples: int,
    confidence: float = CONFIDENCE,
) -> tuple[dict, list[dict]]:
    """Win rate (with its bootstrap interval) of the final model's responses over the `baseline` responses (the SFT
    model's, same decoding), and the per-prompt judgments, for one decoding."""
    label = decoding_name(temperature)
    final_texts = responses(
        final_model,
        tokenizer,
        prompts,
        max_tokens,
        temperature,
        seed,
        DECODE_BATCH,
        f"final responses, {label}",
    )
    judgments = pairwise_judgments(judge, list(items), list(prompts), final_texts, list(baseline))
    outcomes = [j["outcome"] for j in judgments]
    return win_rate(outcomes, bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence), judgments
