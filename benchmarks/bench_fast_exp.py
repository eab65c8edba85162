"""What dpoflow.modeling.generation's fast exp (on by default on the CPU device) buys a decode step, against mlx-lm's
ops.

    python benchmarks/bench_fast_exp.py [--batch 64] [--context 53]     # ~1 min; 1 thread: CPU ms

MLX's CPU `exp` costs ~35 ns per float32 element here (numpy's: ~0.35). dpoflow.modeling.fast_ops.poly_exp (2^n by
exponent bits, 2^f by a degree-6 polynomial; max relative error ~8e-6), compiled with mx.compile, replaces it in:
  swiglu    mlx-lm's `silu(gate) * up` in every MLP
  attention the decode step's softmax (q k^T, max-shift, fast exp, normalize, @ v; GQA by reshape)
  sampler   inverse-CDF sampling on fast-exp weights (B uniforms) instead of mx.random.categorical (B x V Gumbels)
Each is timed as a whole decode step of the SFT model (models/sft, float32) at `--batch` sequences with `--context`
cached tokens, best of 5 (BENCH_THREADS=1: CPU ms), logits checked against the stock step.
Writes results/fast_exp[_t1].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx_lm.models.llama as llama  # noqa: E402
from bench_generation import best_ms  # noqa: E402  (best of 5; CPU ms at 1 thread)
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from dpoflow.modeling import fast_ops  # noqa: E402
from dpoflow.modeling.loading import load_model  # noqa: E402

STOCK_SDPA = llama.scaled_dot_product_attention
STOCK_SWIGLU = llama.swiglu
fast_swiglu = fast_ops._fast_swiglu
fast_sdpa = fast_ops._fast_decode_attention(STOCK_SDPA)


def decode_step(model, batch: int, context: int):
    mx.random.seed(1)
    cache = make_prompt_cache(model)
    model(mx.random.randint(0, 1000, (batch, context)), cache=cache)
    mx.eval([c.state for c in cache])
    x = mx.zeros((batch, 1), dtype=mx.int32)

    def step():
        out = model(x, cache=cache)[:, -1, :]
        mx.eval(out)
        for c in cache:
            c.trim(1)
        return out

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=53)
    ap.add_argument("--temperature", type=float, default=0.9)
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    model, _ = load_model(common.ROOT.parent / "models" / "sft", dtype="float32")
    rows, logits = {}, {}
    for name, swiglu, sdpa in [
        ("stock", STOCK_SWIGLU, STOCK_SDPA),
        ("fast swiglu", fast_swiglu, STOCK_SDPA),
        ("fast swiglu + attention", fast_swiglu, fast_sdpa),
    ]:
        llama.swiglu, llama.scaled_dot_product_attention = swiglu, sdpa
        step = decode_step(model, args.batch, args.context)
        logits[name] = step()
        rows[name] = {"step_ms": best_ms(step)}
    llama.swiglu, llama.scaled_dot_product_attention = STOCK_SWIGLU, STOCK_SDPA
    ref = logits["stock"]
    for name, row in rows.items():
        row["max_abs_logit_diff"] = float(mx.abs(logits[name] - ref).max())
        row["same_argmax"] = bool((logits[name].argmax(-1) == ref.argmax(-1)).all())
        row["tokens_per_s_bound"] = args.batch / row["step_ms"] * 1000
    scaled = ref / args.temperature
    sampler = {
        "categorical_ms": best_ms(lambda: mx.eval(mx.random.categorical(scaled))),
        "inverse_cdf_fast_exp_ms": best_ms(lambda: mx.eval(fast_ops.fast_categorical_sampler(1.0)(scaled))),
    }
    x = mx.random.normal((args.batch, 1536)) * 4
    elementwise = {
        "mx_exp_ms": best_ms(lambda: mx.eval(mx.exp(x))),
        "fast_exp_ms": best_ms(lambda: mx.eval(fast_ops.poly_exp(x))),
        "max_rel_error": float((mx.abs(fast_ops.poly_exp(x) - mx.exp(x)) / mx.exp(x)).max()),
        "elements": x.size,
    }
    for name, row in rows.items():
        print(
            f"{name:26s} {row['step_ms']:7.1f} ms/step  -> {row['tokens_per_s_bound']:5.0f} tok/s bound  "
            f"(max |logit diff| {row['max_abs_logit_diff']:.1e}, same argmax {row['same_argmax']})"
        )
    print(
        f"sampler: categorical {sampler['categorical_ms']:.1f} ms, inverse CDF on fast exp "
        f"{sampler['inverse_cdf_fast_exp_ms']:.1f} ms"
    )
    print(f"exp of {x.size} floats: mx.exp {elementwise['mx_exp_ms']:.2f} ms, fast {elementwise['fast_exp_ms']:.2f} ms")
    result = {
        "batch": args.batch,
        "context": args.context,
        "threads": common.threads(),
        "steps": rows,
        "sampler": sampler,
        "exp": elementwise,
    }
    path = common.write_result("fast_exp" + common.suffix(), result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
