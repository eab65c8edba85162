"""What a faster `exp` would buy a decode step (issue 9's generation target), measured, not wired in.

    python benchmarks/bench_fast_exp.py [--batch 64] [--context 53]     # ~1 min; 1 thread: CPU ms

MLX's CPU `exp` costs ~35 ns per float32 element here (numpy's: ~0.35). A polynomial exp (2^n by exponent bits,
2^f by a degree-6 polynomial; max relative error ~8e-6) compiled with mx.compile replaces it in:
  swiglu    mlx-lm's `silu(gate) * up` in every MLP
  attention the decode step's softmax (q k^T, max-shift, fast exp, normalize, @ v; GQA by reshape)
  sampler   inverse-CDF sampling on fast-exp weights (B uniforms) instead of mx.random.categorical (B x V Gumbels)
Each is timed as a whole decode step of the SFT model (models/sft, float32) at `--batch` sequences with `--context`
cached tokens, best of 5 (BENCH_THREADS=1: CPU ms), logits checked against the stock step.
Writes results/fast_exp[_t1].json.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx_lm.models.llama as llama  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

import common  # noqa: E402
from bench_generation import best_ms  # noqa: E402  (best of 5; CPU ms at 1 thread)
from dpoflow.models import load_model  # noqa: E402

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
POLY = [LN2 ** k / math.factorial(k) for k in range(7)]  # 2^f = e^(f ln 2), Taylor


@mx.compile
def fast_exp(x: mx.array) -> mx.array:
    t = mx.clip(x * LOG2E, -126.0, 126.0)
    n = mx.floor(t)
    f = t - n
    p = POLY[6]
    for c in POLY[5::-1]:
        p = p * f + c
    return p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)


@mx.compile
def fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1 + fast_exp(-gate)) * x


STOCK_SDPA = llama.scaled_dot_product_attention
STOCK_SWIGLU = llama.swiglu


def fast_sdpa(q, k, v, cache, scale, mask, sinks=None):
    if isinstance(mask, str) or q.shape[2] != 1:  # prefill: the stock kernel
        return STOCK_SDPA(q, k, v, cache=cache, scale=scale, mask=mask)
    B, H, _, D = q.shape
    kv = k.shape[1]
    s = (q * scale).reshape(B, kv, H // kv, D) @ k.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -1e30) if mask.dtype == mx.bool_ else s + mask
    e = fast_exp(s - s.max(-1, keepdims=True))
    return ((e / e.sum(-1, keepdims=True)) @ v).reshape(B, H, 1, D)


@mx.compile
def inverse_cdf_sample(logits: mx.array, u: mx.array) -> mx.array:
    e = fast_exp(logits - logits.max(-1, keepdims=True))
    cdf = mx.cumsum(e, axis=-1)
    return (cdf < u * cdf[:, -1:]).sum(-1)


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
    for name, swiglu, sdpa in [("stock", STOCK_SWIGLU, STOCK_SDPA), ("fast swiglu", fast_swiglu, STOCK_SDPA),
                               ("fast swiglu + attention", fast_swiglu, fast_sdpa)]:
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
        "inverse_cdf_fast_exp_ms": best_ms(lambda: mx.eval(inverse_cdf_sample(
            scaled, mx.random.uniform(shape=(scaled.shape[0], 1))))),
    }
    x = mx.random.normal((args.batch, 1536)) * 4
    elementwise = {"mx_exp_ms": best_ms(lambda: mx.eval(mx.exp(x))),
                   "fast_exp_ms": best_ms(lambda: mx.eval(fast_exp(x))),
                   "max_rel_error": float((mx.abs(fast_exp(x) - mx.exp(x)) / mx.exp(x)).max()),
                   "elements": x.size}
    for name, row in rows.items():
        print(f"{name:26s} {row['step_ms']:7.1f} ms/step  -> {row['tokens_per_s_bound']:5.0f} tok/s bound  "
              f"(max |logit diff| {row['max_abs_logit_diff']:.1e}, same argmax {row['same_argmax']})")
    print(f"sampler: categorical {sampler['categorical_ms']:.1f} ms, inverse CDF on fast exp "
          f"{sampler['inverse_cdf_fast_exp_ms']:.1f} ms")
    print(f"exp of {x.size} floats: mx.exp {elementwise['mx_exp_ms']:.2f} ms, fast {elementwise['fast_exp_ms']:.2f} ms")
    result = {"batch": args.batch, "context": args.context, "threads": common.threads(), "steps": rows,
              "sampler": sampler, "exp": elementwise}
    path = common.write_result("fast_exp" + common.suffix(), result)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
