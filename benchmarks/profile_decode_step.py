"""Where one decode step's time goes, op by op (issue 9's generation target: the non-GEMM rest).

    BENCH_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/profile_decode_step.py   # CPU ms
    python benchmarks/profile_decode_step.py [--batch 64] [--context 53] [--model models/base]           # wall ms

Times the ops of one transformer block of the real model (mlx-lm's llama modules, float32) at `--batch` sequences
decoding one token with `--context` cached tokens, each op evaluated on its own (best of 5 of 20 repeats), then
the whole block evaluated as one graph and the whole body (all blocks); swiglu and attention also with
dpoflow.modeling.generation's polynomial exp (not in the sums). Sum of ops x blocks vs the measured body
shows what evaluating op by op adds; GEMM rows give their achieved GFLOP/s.
Writes results/profile_decode_b<batch>[_t1].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402
from bench_fast_exp import fast_sdpa, fast_swiglu  # noqa: E402
from bench_generation import best_ms  # noqa: E402  (best of 5; CPU ms at 1 thread)
from mlx_lm.models.activations import swiglu  # noqa: E402
from mlx_lm.models.base import scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from dpoflow.modeling.loading import load_model  # noqa: E402

REPEATS = 20


def per_call_ms(f) -> float:
    def repeated():
        for _ in range(REPEATS):
            f()

    return best_ms(repeated) / REPEATS


def profile_block(model, batch: int, context: int) -> dict:
    mx.random.seed(0)
    cache = make_prompt_cache(model)
    model(mx.random.randint(0, 1000, (batch, context)), cache=cache)
    mx.eval([c.state for c in cache])
    block, c = model.model.layers[0], cache[0]
    attn, mlp = block.self_attn, block.mlp
    D, H, KV = model.args.hidden_size, attn.n_heads, attn.n_kv_heads
    hd = D // H
    I = mlp.gate_proj.weight.shape[0]  # noqa: E741 (the paper notation: M x D x I)
    x = mx.random.normal((batch, 1, D))
    q = mx.random.normal((batch, H, 1, hd))
    k1 = mx.random.normal((batch, KV, 1, hd))
    h_mlp = mx.random.normal((batch, 1, I))
    mx.eval(x, q, k1, h_mlp)

    def cache_update():
        keys, values = c.update_and_fetch(k1, k1)
        mx.eval(keys, values)
        c.trim(1)
        return keys, values

    keys, values = cache_update()  # what the attention op reads

    def flops(m, k, n):
        return 2.0 * m * k * n

    M = batch
    ops = {  # name -> (function, FLOPs of its matmuls or 0); all but attention's are weight GEMMs
        "input rms_norm": (lambda: mx.eval(block.input_layernorm(x)), 0),
        "q,k,v projections": (
            lambda: mx.eval(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)),
            flops(M, D, H * hd) + 2 * flops(M, D, KV * hd),
        ),
        "reshape+transpose+rope q,k": (
            lambda: mx.eval(
                attn.rope(x.reshape(batch, 1, H, -1).transpose(0, 2, 1, 3), offset=context),
                attn.rope(k1, offset=context),
            ),
            0,
        ),
        "kv cache write+fetch": (cache_update, 0),
        "attention (sdpa)": (
            lambda: mx.eval(scaled_dot_product_attention(q, keys, values, cache=c, scale=attn.scale, mask=None)),
            2 * flops(M * H, hd, context + 1),
        ),
        "o_proj": (lambda: mx.eval(attn.o_proj(x)), flops(M, H * hd, D)),
        "residual add + post rms_norm": (lambda: mx.eval(block.post_attention_layernorm(x + x)), 0),
        "gate,up projections": (lambda: mx.eval(mlp.gate_proj(x), mlp.up_proj(x)), 2 * flops(M, D, I)),
        "swiglu": (lambda: mx.eval(swiglu(h_mlp, h_mlp)), 0),
        "down_proj + residual add": (lambda: mx.eval(mlp.down_proj(h_mlp) + x), flops(M, I, D)),
        "empty eval (dispatch floor)": (lambda: mx.eval(x + 0), 0),
    }
    alternatives = {  # not in the sum: the same op with dpoflow.modeling.generation's polynomial exp
        "swiglu, polynomial exp": lambda: mx.eval(fast_swiglu(h_mlp, h_mlp)),
        "attention, polynomial exp": lambda: mx.eval(fast_sdpa(q, keys, values, c, attn.scale, None)),
    }
    rows = {}
    for name, (f, gemm) in ops.items():
        ms = per_call_ms(f)
        rows[name] = {
            "ms": ms,
            "gflops": gemm / ms / 1e6 if gemm else None,
            "weight_gemm": bool(gemm) and name != "attention (sdpa)",
        }
    alt_rows = {name: {"ms": per_call_ms(f)} for name, f in alternatives.items()}

    def whole_block():
        mx.eval(block(x, mask=None, cache=c))
        c.trim(1)

    def body():
        mx.eval(model.model(mx.zeros((batch, 1), dtype=mx.int32), cache=cache))
        for layer_cache in cache:
            layer_cache.trim(1)

    sum_ops = sum(r["ms"] for n, r in rows.items() if not n.startswith("empty"))
    gemm_ms = sum(r["ms"] for r in rows.values() if r["weight_gemm"])
    n_layers = len(model.model.layers)
    return {
        "batch": batch,
        "context": context,
        "layers": n_layers,
        "ops": rows,
        "alternatives": alt_rows,
        "sum_of_ops_ms": sum_ops,
        "gemm_ms": gemm_ms,
        "block_ms": per_call_ms(whole_block),
        "body_ms": best_ms(body),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=53)
    ap.add_argument("--model", default=str(common.ROOT.parent / "models" / "base"))
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    model, _ = load_model(args.model, dtype="float32")
    r = profile_block(model, args.batch, args.context)
    gemm = common.gemm_gflops_mlx()
    print(f"one block, batch {r['batch']}, context {r['context']} ({'CPU' if common.threads() == 1 else 'wall'} ms):")
    for name, row in r["ops"].items():
        rate = f"  {row['gflops']:6.1f} GFLOP/s" if row["gflops"] else ""
        print(f"  {name:30s} {row['ms']:7.3f}  {row['ms'] / r['block_ms'] * 100:5.1f}%{rate}")
    for name, row in r["alternatives"].items():
        print(f"  ({name:28s} {row['ms']:7.3f})")
    print(
        f"  sum of ops {r['sum_of_ops_ms']:.3f} (weight GEMMs {r['gemm_ms']:.3f}); "
        f"block as one graph {r['block_ms']:.3f}; "
        f"x {r['layers']} = {r['block_ms'] * r['layers']:.1f}; body measured {r['body_ms']:.1f}"
    )
    print(f"same-run GEMM rate (SmolLM2 shapes): {gemm:.0f} GFLOP/s")
    path = common.write_result(
        f"profile_decode_b{args.batch}" + common.suffix(), {**r, "gemm_gflops": gemm, "threads": common.threads()}
    )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
