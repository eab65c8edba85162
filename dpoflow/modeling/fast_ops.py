"""Faster elementwise ops for the CPU device, for sampling and for the forward-only passes, and CPU execution helpers
(BLAS threads, worker threads on their own MLX streams, glibc malloc reuse).

MLX's CPU `exp` (and `sigmoid`, `logsumexp`) are scalar loops here: ~16-21 ns per float32 element against ~0.6 ns
for an add, so the SwiGLU activation, the attention softmax and the vocabulary log-softmax cost as much as a large
share of the GEMMs (benchmarks/RESULTS.md). Two replacements built from MLX's own compiled elementwise ops:

- `poly_exp`: 2^n * 2^f with a degree-6 Taylor polynomial (max relative error ~8e-6, exactly 0 below exp(-87.3)).
  Sampling only: `fast_exp_ops(model)` patches a model's own module with it while `generate` runs (SwiGLU, the
  attention softmax of prefill and decode steps), and `inverse_cdf_sample` draws from fast-exp weights.
- `mlx_exp`: MLX's own CPU exp algorithm as compiled ops, within 1 ulp of `mx.exp` (tests), ~3x faster.
  `mlx_exp_ops(model)` patches the model's module with SwiGLU and attention on it; `mlx_logsumexp` is the
  vocabulary normalizer. The forward-only passes (reference log-probs, implicit rewards, reward-model scoring)
  use these: the stock ops' numbers within float32 rounding.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import numpy as np

try:  # reads and sets the BLAS library's thread count (a dependency of lm-eval's scikit-learn)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

_LOG2E = 1.4426950408889634
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7)]  # 2^f = e^(f ln 2) for f in [0, 1)


def _floor(y: mx.array) -> mx.array:
    """floor(y) as int32 for |y| < 2^31 from truncation: the compiled kernels are built for baseline x86-64, where
    mx.floor is a libm call per element (~1.5 ns); the conversion is one SSE2 instruction."""
    n = y.astype(mx.int32)
    return n - (y < n.astype(y.dtype)).astype(mx.int32)


@mx.compile
def poly_exp(x: mx.array) -> mx.array:
    """exp(x) = 2^n * 2^f: n from the float exponent bits, 2^f by a degree-6 polynomial (relative error < 1e-5).
    Below x = -87.3 (2^-126) the result is exactly 0 (n = -127 gives zero bits): masked attention scores must not
    become subnormal weights, which x86 computes on a slow path (a decode step with masked columns ran ~1.18x as
    long; benchmarks/profile_generation_loop.py). No gradient: sampling only."""
    t = mx.clip(x * _LOG2E, -127.0, 126.0)
    n = _floor(t)
    f = t - n.astype(t.dtype)
    p = _EXP2_TAYLOR[6]
    for c in _EXP2_TAYLOR[5::-1]:
        p = p * f + c
    return (p * ((n + 127) << 23).view(mx.float32)).astype(x.dtype)


# MLX's CPU exp (mlx/backend/cpu/simd/math.h: 2^(x log2 e), the fraction by a degree-6 polynomial in fma steps, inf
# above 88, 0 below -88) is a scalar loop on x86 (~16 ns per element). The same algorithm as compiled MLX ops (mul +
# add in place of fma) gives the same numbers within 1 ulp, ~3x faster.
_MLX_LOG2E = 1.442695
_MLX_EXP2 = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)


@mx.compile
def mlx_exp(x: mx.array) -> mx.array:
    """mx.exp within 1 ulp (90% of float32 inputs bit-identical; tests/test_generation.py), ~3x faster on the CPU:
    MLX's own CPU algorithm written as compiled elementwise ops. No gradient: forward-only passes."""
    t = x.astype(mx.float32) * _MLX_LOG2E
    n = _floor(t + 0.5)
    f = t - n.astype(mx.float32)
    p = mx.array(_MLX_EXP2[0], dtype=mx.float32)
    for c in _MLX_EXP2[1:]:
        p = p * f + c
    e = ((n + 127) << 23).view(mx.float32) * p
    return mx.where(x > 88.0, mx.inf, mx.where(x < -88.0, 0.0, e)).astype(x.dtype)


@mx.compile
def _fast_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate / (1 + poly_exp(-gate)) * x


@mx.compile
def _mlx_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `silu(gate) * x` = gate * sigmoid(gate) * x, sigmoid = 1 / (1 + exp(-gate)) on mlx_exp."""
    return gate * (1 / (1 + mlx_exp(-gate))) * x


def mlx_logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    """mx.logsumexp along `axis` (the vocabulary normalizer of log-probs) on mlx_exp: the same numbers within
    float32 rounding (MLX's CPU kernel computes the same max-shifted sum), ~2x faster. Rows must be finite."""
    m = x.max(axis, keepdims=True)
    return mx.log(mlx_exp(x - m).sum(axis)) + m.squeeze(axis)


def _masked_softmax(exp: Callable[[mx.array], mx.array]):
    """softmax over the last axis of scores where `mask` (bool, broadcastable) holds, on `exp`, compiled (the
    where / shift / exp / divide fused around the two reductions)."""

    @mx.compile
    def softmax(scores: mx.array, mask: mx.array) -> mx.array:
        s = mx.where(mask, scores, -1e30)
        e = exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return softmax


def _softmax_attention(exp: Callable[[mx.array], mx.array], stock):
    """mlx-lm's `scaled_dot_product_attention` with the softmax on `exp`, for any query length (decode steps and
    prefill) with array or "causal" masks; attention sinks and quantized caches go to `stock`."""
    softmax = _SOFTMAX[exp]

    def attention(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or hasattr(cache, "bits") or (isinstance(mask, str) and mask != "causal"):
            return stock(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        B, H, L, D = queries.shape
        kv_heads, S = keys.shape[1], keys.shape[2]
        groups = H // kv_heads  # grouped-query attention by reshape: `groups` queries per key head
        q = (queries * scale).reshape(B, kv_heads, groups * L, D)
        scores = (q @ keys.swapaxes(-1, -2)).reshape(B, kv_heads, groups, L, S)
        if isinstance(mask, str):  # causal, queries aligned to the last L keys
            mask = mx.arange(S)[None] <= (mx.arange(L) + (S - L))[:, None]
        if mask is None:
            mask = mx.array(True)
        elif mask.dtype != mx.bool_:  # additive
            scores, mask = scores + mask, mx.array(True)
        elif mask.ndim == 4:  # [B or 1, 1 or H, L or 1, S] -> broadcastable to [B, kv_heads, groups, L, S]
            b, h, lm = mask.shape[:3]
            mask = mask[:, :, None] if h == 1 else mask.reshape(b, kv_heads, groups, lm, S)
        weights = softmax(scores, mask).reshape(B, kv_heads, groups * L, S)
        return (weights.astype(values.dtype) @ values).reshape(B, H, L, D).astype(queries.dtype)

    return attention


_SOFTMAX = {poly_exp: _masked_softmax(poly_exp), mlx_exp: _masked_softmax(mlx_exp)}


def _fast_decode_attention(stock):
    """The attention of `fast_exp_ops` (poly_exp softmax); kept under its old name for the benchmarks."""
    return _softmax_attention(poly_exp, stock)


@contextmanager
def _patched(model: Any, swiglu, exp: Callable[[mx.array], mx.array] | None):
    """Module globals of the model's modules: `swiglu`, and the attention on `exp` (kept when exp is None)."""
    modules = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    saved = []
    patches = [("swiglu", lambda stock: swiglu)]
    if exp is not None:
        patches.append(("scaled_dot_product_attention", lambda stock: _softmax_attention(exp, stock)))
    for module in modules:
        for name, make in patches:
            stock = getattr(module, name, None)
            if callable(stock):
                saved.append((module, name, stock))
                setattr(module, name, make(stock))
    try:
        yield
    finally:
        for module, name, stock in reversed(saved):
            setattr(module, name, stock)


@contextmanager
def fast_exp_ops(model: Any):
    """While inside: the modules that define the model's layers use `_fast_swiglu` and the poly_exp attention
    softmax (module globals, as mlx-lm's models call them); restored on exit. Sampling only."""
    with _patched(model, _fast_swiglu, poly_exp):
        yield


@contextmanager
def mlx_exp_ops(model: Any):
    """While inside: the model's module uses SwiGLU and the attention softmax on `mlx_exp` (the stock ops' numbers
    within float32 rounding, ~3x faster, no gradient); restored on exit. For forward-only passes."""
    with _patched(model, _mlx_swiglu, mlx_exp):
        yield


# ---------------------------------------------------------------------------------------------------------------
# CPU execution: BLAS threads, worker threads with their own streams, malloc


def blas_threads() -> tuple[int, Any]:
    """(threads of the BLAS MLX calls, a threadpoolctl controller of it or None)."""
    try:
        blas = ThreadpoolController().select(user_api="blas")
        if blas.lib_controllers:
            return min(c.num_threads for c in blas.lib_controllers), blas
    except Exception:  # threadpoolctl missing or unable to read the library: leave the BLAS alone
        pass
    return (os.cpu_count() or 1), None


def run_in_threads(jobs: list, device) -> None:
    """Run each job in its own thread on its own MLX stream (streams are per thread in MLX); re-raise the first
    error. MLX's eval returns only once a graph is nearly done (it keeps ~10 tasks in flight), so one thread cannot
    keep two streams busy: generation's lanes each need their own."""
    errors: list[BaseException] = []

    def run(job) -> None:
        try:
            with mx.stream(mx.new_stream(device)):
                job()
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(e)
        finally:
            mx.clear_streams()  # a stream left behind by its ended thread can abort the process at exit

    workers = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """glibc malloc (Linux): serve allocations up to 32 MB from the heap and keep freed memory for reuse instead of
    returning it to the system. MLX's CPU allocator has no buffer cache (it calls aligned_alloc / free), and glibc
    maps and unmaps every large block: each decode step's logits, weights and activations came back as fresh pages,
    ~9 us of page fault each here (a [64, 49152] float32 exp: 42 ms, 15 ms with this; benchmarks/RESULTS.md).
    Process-wide and persistent; does nothing when MALLOC_* / GLIBC_TUNABLES are set or mallopt is missing."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    _MALLOC_TUNED = True
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's maximum
    mallopt(m_trim_threshold, 2**30)


# ---------------------------------------------------------------------------------------------------------------
# Differentiable versions (training): mlx_exp forward, the analytic gradient


@mx.custom_function
def trainable_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """_mlx_swiglu with the gradient of silu(gate) * x (mlx_exp's bit tricks have no derivative of their own)."""
    return _mlx_swiglu(gate, x)


@trainable_swiglu.vjp
def _trainable_swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    s = 1 / (1 + mlx_exp(-gate))
    return cotangent * x * s * (1 + gate * (1 - s)), cotangent * gate * s


@mx.custom_function
def trainable_logsumexp(x: mx.array) -> mx.array:
    """mlx_logsumexp over the last axis with its gradient softmax(x)."""
    return mlx_logsumexp(x)


@trainable_logsumexp.vjp
def _trainable_logsumexp_vjp(x, cotangent, output):  # one argument: MLX passes it alone, not in a tuple
    return cotangent[..., None] * mlx_exp(x - output[..., None])


@contextmanager
def mlx_exp_training_ops(model: Any):
    """While inside: the model's module uses trainable_swiglu (attention keeps MLX's fused SDPA and its gradient).
    Measures how much of a training step is MLX's single-threaded exp (benchmarks/bench_threads.py)."""
    with _patched(model, trainable_swiglu, None):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Temperature sampling by inverse CDF

SAMPLE_BLOCK = 128  # vocabulary entries per block of the two-level inverse CDF


@mx.compile
def _weights(logits: mx.array, inv_temp: mx.array) -> mx.array:
    return poly_exp((logits - logits.max(-1, keepdims=True)) * inv_temp)


def inverse_cdf_sample(logits: mx.array, u: mx.array, temperature: float) -> mx.array:
    """Token ids [B] drawn from softmax(logits / temperature) [B, V] with one uniform u [B] in [0, 1) per row: the
    first token whose cumulative weight exceeds u * total. Two levels, so that nothing scans the vocabulary
    serially: block sums of SAMPLE_BLOCK entries, the block holding the target, then the target inside it
    (weights on poly_exp). The same u gives the same token whatever the batch (up to float rounding)."""
    B, V = logits.shape
    w = _weights(logits, mx.array(1.0 / temperature, dtype=logits.dtype))
    if V % SAMPLE_BLOCK:
        w = mx.pad(w, [(0, 0), (0, SAMPLE_BLOCK - V % SAMPLE_BLOCK)])
    blocks = w.reshape(B, -1, SAMPLE_BLOCK)
    n_blocks = blocks.shape[1]
    sums = blocks.sum(-1)  # [B, n_blocks]
    cdf = mx.cumsum(sums, axis=-1)
    target = u.reshape(B, 1).astype(cdf.dtype) * cdf[:, -1:]
    j = mx.minimum((cdf <= target).sum(-1), n_blocks - 1)[:, None]  # the block whose cumulative sum passes target
    rest = target - (mx.take_along_axis(cdf, j, -1) - mx.take_along_axis(sums, j, -1))
    inner = mx.cumsum(mx.take_along_axis(blocks, j[..., None], 1).squeeze(1), axis=-1)  # [B, SAMPLE_BLOCK]
    k = mx.minimum((inner <= rest).sum(-1), SAMPLE_BLOCK - 1)
    return mx.minimum(j.squeeze(1) * SAMPLE_BLOCK + k, V - 1)


def fast_categorical_sampler(temperature: float):
    """Draws token i with probability softmax(logits / temperature)_i: inverse_cdf_sample on mlx's global random
    uniforms (generate itself draws per-sequence uniforms, `sequence_uniforms`)."""
    return lambda logits: inverse_cdf_sample(logits, mx.random.uniform(shape=(logits.shape[0],)), temperature)


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def sequence_uniforms(seed: int, sequences: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) (float32, 24 bits) per (sequence, step): a counter-based hash (splitmix64 of seed,
    sequence index and token index), so a sequence's draws do not depend on which row, lane or batch it decodes in.
    """
    a = np.atleast_1d(np.asarray(sequences, dtype=np.uint64))
    b = np.atleast_1d(np.asarray(steps, dtype=np.uint64))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash wants
        x = np.full(np.broadcast(a, b).shape, seed % 2**64, dtype=np.uint64) * _MIX[0]
        x = x + a * _MIX[1] + b * _MIX[2] + (a << np.uint64(32))
        for _ in range(2):  # splitmix64's finalizer, twice
            x = x + _MIX[0]
            x = (x ^ (x >> np.uint64(30))) * _MIX[1]
            x = (x ^ (x >> np.uint64(27))) * _MIX[2]
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
