"""The SFT model's responses to the win-rate prompts, in both decodings Stage 7 judges (the gated one and the one
reported beside it). A stage of its own so that they are computed once: DVC reruns it only when the SFT model, the
eval prompts or the decoding params change, not on every rerun of Stages 5-7.

    python stages/sft_responses.py    # DVC stage `sft_responses`: data/sft_responses.jsonl
"""

import time
from pathlib import Path

import click

from dpoflow.data import tasks
from dpoflow.data.prompts import prompt_of
from dpoflow.eval.win_rate import baseline_responses
from dpoflow.modeling import loading
from dpoflow.runtime import io
from dpoflow.runtime.device import numerics_environment
from dpoflow.runtime.errors import user_errors
from dpoflow.runtime.params import load_params

SFT = Path("models/sft")
EVAL_PROMPTS = Path("data/tasks/eval.jsonl")
OUT = Path("data/sft_responses.jsonl")
PERF = Path("reports/perf/sft_responses.json")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@user_errors
def main(params_path: str) -> None:
    p = load_params(params_path)
    t0 = time.perf_counter()
    model, tokenizer = loading.load_model(SFT, dtype=p.model.dtype)
    model.freeze()
    items = tasks.read_split(EVAL_PROMPTS)[: p.evaluate.win_rate_prompts]
    prompts = [prompt_of(item, p.data.system_prompt or None) for item in items]
    rows = baseline_responses(
        model, tokenizer, items, prompts, p.preference.max_tokens, p.evaluate.win_rate_temperature, p.seed
    )
    io.write_jsonl(OUT, rows)
    seconds = time.perf_counter() - t0
    io.write_json(PERF, {"seconds": seconds, "responses": len(rows), "environment": numerics_environment()})
    click.echo(f"sft_responses: {len(rows)} responses ({len(items)} prompts x 2 decodings) in {seconds:.0f} s -> {OUT}")


if __name__ == "__main__":
    main()
