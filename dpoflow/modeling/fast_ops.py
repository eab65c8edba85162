"""A polynomial exp for the CPU device, and the decode ops that use it (SwiGLU, the decode step's attention softmax,
inverse-CDF temperature sampling). MLX's CPU `exp` is a scalar loop (~35 ns per float here, numpy's ~0.35); the
polynomial (max relative error ~8e-6, exactly 0 below exp(-87.3)) makes a 2-thread decode step ~1.3x faster
(benchmarks/RESULTS.md). `fast_exp_ops(model)` patches a model's own module while it generates.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Any

import mlx.core as mx

_LOG2E = 1.4426950408889634
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7)]  # 2^f = e^(f ln 2) for f in [0, 1)


@mx.compile
def poly_exp(x: mx.array) -> mx.array:
    """exp(x) = 2^n * 2^f: n from the float exponent bits, 2^f by a degree-6 polynomial (relative error < 1e-5).
    Below x = -87.3 (2^-126) the result is exactly 0 (n = -127 gives zero bits): masked attention scores must not
    become subnormal weights, which x86 computes on a slow path (a decode step with masked columns ran ~1.18x as
    long; benchmarks/profile_generation_loop.py). No gradient: sampling only."""
    t = mx.clip(x * _LOG2E, -127.0, 126.0)
    n = mx.floor(t)
    f = t - n
    p = _EXP2_TAYLOR[6]
    for c in _EXP2_TAYLOR[5::-1]:
        p = p * f + c
    return (p * ((n.astype(mx.int32) + 127) << 23).view(mx.float32)).astype(x.dtype)


@mx.compile
def _fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1 + poly_exp(-gate)) * x


def _fast_decode_attention(stock):
    """mlx-lm's `scaled_dot_product_attention` with the softmax on poly_exp for one-token queries (decode steps);
    prefill, string masks and attention sinks go to `stock`."""

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or isinstance(mask, str) or queries.shape[2] != 1 or hasattr(cache, "bits"):
            return stock(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        B, H, _, D = queries.shape
        kv_heads = keys.shape[1]  # grouped-query attention by reshape: H // kv_heads queries per key head
        scores = (queries * scale).reshape(B, kv_heads, H // kv_heads, D) @ keys.swapaxes(-1, -2)
        if mask is not None:
            scores = mx.where(mask, scores, -1e30) if mask.dtype == mx.bool_ else scores + mask
        weights = poly_exp(scores - scores.max(-1, keepdims=True))
        out = (weights / weights.sum(-1, keepdims=True)) @ values
        return out.reshape(B, H, 1, D).astype(queries.dtype)

    return attention


@mx.compile
def _inverse_cdf(logits: mx.array, u: mx.array) -> mx.array:
    weights = poly_exp(logits - logits.max(-1, keepdims=True))
    cdf = mx.cumsum(weights, axis=-1)
    return (cdf < u * cdf[:, -1:]).sum(-1)


def fast_categorical_sampler(temperature: float):
    """Draws token i with probability softmax(logits / temperature)_i: one uniform per row against the fast-exp CDF."""
    inv_temp = 1.0 / temperature
    return lambda logits: _inverse_cdf(logits * inv_temp, mx.random.uniform(shape=(logits.shape[0], 1)))


@contextmanager
def fast_exp_ops(model: Any):
    """While inside: the modules that define the model's layers use `_fast_swiglu` and the fast decode attention
    (module globals, as mlx-lm's models call them); restored on exit."""
    modules = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    saved = []
    for module in modules:
        for name, make in (
            ("swiglu", lambda stock: _fast_swiglu),
            ("scaled_dot_product_attention", _fast_decode_attention),
        ):
            stock = getattr(module, name, None)
            if callable(stock):
                saved.append((module, name, stock))
                setattr(module, name, make(stock))
    try:
        yield
    finally:
        for module, name, stock in saved:
            setattr(module, name, stock)
