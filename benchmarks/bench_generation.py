"""Generation throughput of dpoflow.modeling.generation.generate on Stage 2's workload (dpoflow's venv).

    python benchmarks/bench_generation.py [--prompts 64] [--samples 4] [--max-tokens 16] [--temperature 0.9]

Stage 2's real prompts (data/tasks/pref_prompts.jsonl, params.yaml's system prompt), K samples each, batch 64:
  dpoflow (shared prefill + fixed decode slots, fast exp: the CPU default)  vs  the same with mlx-lm's exp ops
  (fast_exp=False)  vs  mlx-lm's batch_generate with K copies of each prompt (what dpoflow ran before: every copy
  prefilled, BatchGenerator's continuous batching)  vs  one prompt at a time
plus where a decode step's time goes (model body, LM head, normalization + sampler, the rest = Python/bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx_lm.generate import batch_generate  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

from dpoflow.core.batching import encode_prompt  # noqa: E402
from dpoflow.data.tasks import item_prompt  # noqa: E402
from dpoflow.modeling.generation import generate  # noqa: E402
from dpoflow.modeling.loading import load_model  # noqa: E402

SYSTEM = "Reply with only the final answer, no explanation."


CLOCK = time.process_time if common.threads() == 1 else time.perf_counter  # 1 thread: CPU time


def best_ms(f, n=5) -> float:
    f()
    out = float("inf")
    for _ in range(n):
        t = CLOCK()
        f()
        out = min(out, CLOCK() - t)
    return out * 1000


def decode_breakdown(model, batch: int, context: int, temperature: float) -> dict:
    """Best-of-5 milliseconds of one decode step's parts at `batch` sequences with `context` cached tokens."""
    cache = make_prompt_cache(model)
    model(mx.random.randint(0, 1000, (batch, context)), cache=cache)
    mx.eval([c.state for c in cache])
    x = mx.zeros((batch, 1), dtype=mx.int32)

    def body():
        mx.eval(model.model(x, cache=cache))
        for c in cache:
            c.trim(1)

    h = mx.random.normal((batch, 1, model.args.hidden_size))
    logits = mx.random.normal((batch, model.args.vocab_size))
    mx.eval(h, logits)
    sampler = make_sampler(temp=temperature)
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    return {
        "batch": batch,
        "context": context,
        "body_ms": best_ms(body),
        "lm_head_ms": best_ms(lambda: mx.eval(head(h))),
        "normalize_ms": best_ms(lambda: mx.eval(logits - mx.logsumexp(logits, axis=-1, keepdims=True))),
        "sampler_ms": best_ms(lambda: mx.eval(sampler(logits))),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--one-by-one", type=int, default=8, help="sequences for the one-by-one baseline")
    ap.add_argument("--batch-sizes", default="64,128,256")
    args = ap.parse_args()
    model, tok = load_model(common.MODEL_DIR.parent / "base")
    items = [
        json.loads(line) for line in (common.ROOT.parent / "data/tasks/pref_prompts.jsonl").read_text().splitlines()
    ]
    prompts = [item_prompt(it, SYSTEM) for it in items[: args.prompts]]
    kw = dict(n_samples=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    runs = []

    cpu_mark = [time.process_time()]

    def record(name, g, batch):
        cpu = time.process_time() - cpu_mark[0]
        runs.append(
            {
                "name": name,
                "batch_size": batch,
                "sequences": sum(len(t) for t in g.token_ids),
                "cpu_seconds": cpu,
                "tokens_per_cpu_sec": g.generated_tokens / cpu,
                "generated_tokens": g.generated_tokens,
                "seconds": g.seconds,
                "tokens_per_sec": g.tokens_per_sec,
                "prompt_tokens": g.prompt_tokens,
                "prefill_seconds": g.prefill_seconds,
                "decode_seconds": g.seconds - g.prefill_seconds,
                "load": common.cpu_load(),
            }
        )
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "load"}), flush=True)
        runs[-1]["gemm_gflops"] = common.gemm_gflops_mlx()
        cpu_mark[0] = time.process_time()

    generate(model, tok, prompts[:4], **{**kw, "max_tokens": 4})  # warm-up
    cpu_mark[0] = time.process_time()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for b in batches:
        record("dpoflow (shared prefill, decode slots, fast exp)", generate(model, tok, prompts, batch_size=b, **kw), b)
    record(
        "dpoflow, mlx-lm's exp (fast_exp=False)",
        generate(model, tok, prompts, batch_size=batches[0], fast_exp=False, **kw),
        batches[0],
    )

    class _G:  # a Generations-like record
        def __init__(self, token_ids, seconds, prompt_tokens, prefill_seconds):
            self.token_ids, self.seconds = [[t] for t in token_ids], seconds  # [sequence][1] -> ids
            self.generated_tokens = sum(len(t) for t in token_ids)
            self.tokens_per_sec = self.generated_tokens / seconds
            self.prompt_tokens, self.prefill_seconds = prompt_tokens, prefill_seconds

    flat = [encode_prompt(tok, p) for p in prompts for _ in range(args.samples)]
    mx.random.seed(0)
    t0 = time.perf_counter()
    out = batch_generate(
        model,
        tok,
        flat,
        max_tokens=args.max_tokens,
        return_token_ids=True,
        sampler=make_sampler(temp=args.temperature),
        completion_batch_size=batches[0],
        prefill_batch_size=min(batches[0], 32),
    )
    eos = set(tok.eos_token_ids)
    ids = [[t for t in seq if t not in eos] for seq in out.token_ids]
    record(
        "mlx-lm batch_generate, K copies (dpoflow before)",
        _G(ids, time.perf_counter() - t0, out.stats.prompt_tokens, out.stats.prompt_time),
        batches[0],
    )
    one = prompts[: args.one_by_one]
    seqs = [generate(model, tok, [p], batch_size=1, **{**kw, "n_samples": 1}) for p in one]
    _one = _G(
        [g.token_ids[0][0] for g in seqs],
        sum(g.seconds for g in seqs),
        sum(g.prompt_tokens for g in seqs),
        sum(g.prefill_seconds for g in seqs),
    )
    record("one prompt at a time (dpoflow, batch 1)", _one, 1)
    mean_ctx = 45 + args.max_tokens // 2
    breakdown = [decode_breakdown(model, b, mean_ctx, args.temperature) for b in batches]
    out = {"workload": vars(args), "runs": runs, "decode_breakdown": breakdown}
    out["threads"] = common.threads()
    print(common.write_result("generation" + common.suffix(), out))
    print(json.dumps(breakdown))


if __name__ == "__main__":
    main()
