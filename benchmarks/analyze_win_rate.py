"""Why the embedded default's greedy win rate is flat: accuracy of models/sft and models/final by decoding, and the
greedy errors split by how confidently wrong the model is.

    .venv/bin/python benchmarks/analyze_win_rate.py     # after `dvc repro` (needs models/sft, models/final); ~3 min

Same prompts (the first evaluate.win_rate_prompts of data/tasks/eval.jsonl), system prompt, max tokens, seed and
verifier (tasks.score) as Stage 7. A greedy error is "confident" when none of `--samples` samples at the Stage 2
temperature is right: Stage 2's verifier can build no pair for that prompt. Writes results/win_rate_analysis.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from dpoflow.data import tasks  # noqa: E402
from dpoflow.modeling.generation import generate  # noqa: E402
from dpoflow.modeling.loading import load_model
from dpoflow.runtime import io
from dpoflow.runtime.params import load_params  # noqa: E402


def accuracy(model, tokenizer, items, prompts, temperature, n_samples, max_tokens, seed) -> np.ndarray:
    """[n_prompts, n_samples] verifier scores (1 right, 0 wrong)."""
    gens = generate(
        model,
        tokenizer,
        prompts,
        n_samples=n_samples,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        batch_size=64,
        desc=f"T={temperature:g}",
    )
    return np.array([[tasks.score(item, text) for text in texts] for item, texts in zip(items, gens.texts)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperatures", default="0,0.7,1.0")
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args()
    p = load_params(PROJECT / "params.yaml")
    items = tasks.read_split(PROJECT / "data/tasks/eval.jsonl")[: p.evaluate.win_rate_prompts]
    prompts = [tasks.item_prompt(item, p.data.system_prompt or None) for item in items]
    out: dict = {"n_prompts": len(items), "samples": args.samples, "sample_temperature": p.preference.temperature}
    for name in ("sft", "final"):
        model, tokenizer = load_model(PROJECT / "models" / name)
        greedy = accuracy(model, tokenizer, items, prompts, 0.0, 1, p.preference.max_tokens, p.seed)[:, 0]
        row: dict = {"accuracy_t0": float(greedy.mean())}
        for t in (float(x) for x in args.temperatures.split(",") if float(x) > 0):
            row[f"accuracy_t{t:g}"] = float(
                accuracy(model, tokenizer, items, prompts, t, 1, p.preference.max_tokens, p.seed).mean()
            )
        right = accuracy(
            model, tokenizer, items, prompts, p.preference.temperature, args.samples, p.preference.max_tokens, p.seed
        ).sum(axis=1)
        wrong = greedy < 1
        row |= {
            "greedy_errors": int(wrong.sum()),
            "greedy_errors_confident": int((right[wrong] == 0).sum()),
            "greedy_errors_uncertain": int((right[wrong] > 0).sum()),
            "prompts_with_a_pair": int(((right > 0) & (right < args.samples)).sum()),
        }
        out[name] = row
        print(name, json.dumps(row), flush=True)
    io.write_json(Path(__file__).resolve().parent / "results" / "win_rate_analysis.json", out)


if __name__ == "__main__":
    main()
