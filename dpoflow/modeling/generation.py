"""Batched sampling for every stage (Stage 1 validation, Stage 2's K samples per prompt, KL samples, 6, 7), seeded,
with a progress bar and throughput figures. Measurements: benchmarks/RESULTS.md.

Shared prefill. The common prefix of the distinct prompts (the chat template's system turn) runs once (batch 1); the
middle prompt[len(prefix):-1] of each DISTINCT prompt runs once, PREFILL_BATCH prompts a forward, left-padded and
attending to the prefix's keys/values; a sequence (prompt p, sample k) starts from p's keys/values with p's last
token as its first input.

Fixed decode slots. B sequences decode together; every layer keeps keys/values in one [B, H, P + R, D] buffer: the
first P columns hold the common prefix (written once), the other R form a ring that every row writes at the same
column per step (step t: t mod R). Row i's sequence occupies the ring columns of [start_i, t] (masked elsewhere; RoPE
position P + t - start_i). R = widest middle + max_tokens, so a sequence never overruns itself, nothing is shifted
and attention reads P + R columns at every step. A finished row is refilled in place with the next sequence's
middle (right-aligned at the current column): no per-finish gather of every layer's cache (mlx-lm's BatchGenerator).

Lanes (CPU). MLX runs a step's elementwise ops (SwiGLU, softmaxes, norms, the sampler) on one thread and the host's
bookkeeping is serial, so one batch on two BLAS threads leaves a core idle for much of every step. With >= 2 BLAS
threads the rows are split into two lanes, each decoded by its own thread on its own MLX stream with half the BLAS
threads, sharing the queue of pending sequences: one lane's elementwise ops, sampling, bookkeeping and prefill run
while the other's GEMMs do. (mx.async_eval on one thread cannot do this: MLX's eval returns only once a graph is
nearly done.)

Sampling. Temperature sampling (top_p = 1) with the fast exp draws by inverse CDF on poly_exp weights, with one
uniform per (sequence, token index) from a counter-based hash of the seed (fast_ops.sequence_uniforms): a sequence's
samples do not depend on the batch size, the lanes or the scheduling. Greedy is argmax; top-p and `fast_exp=False`
use mlx-lm's sampler on mlx's global random state (seeded here; one lane, so the order of draws is fixed).

Fast exp (on by default on the CPU device). MLX's CPU `exp` is a scalar loop; while `generate` runs, the model's own
module gets a polynomial exp (relative error ~8e-6) in its `swiglu` and attention (fast_ops.fast_exp_ops). Logits
move by ~1e-4; `fast_exp=False` keeps the stock ops (Metal and CUDA keep them by default).

Greedy output equals mlx-lm's batch generation with `fast_exp=False` (tests/test_generation.py); sampling is
deterministic for a seed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from dpoflow.core.batching import encode_prompt
from dpoflow.modeling.fast_ops import (
    blas_threads,
    fast_exp_ops,
    inverse_cdf_sample,
    keep_freed_memory,
    run_in_threads,
    sequence_uniforms,
)

PREFILL_BATCH = 32  # distinct prompts prefilled together
DECODE_BATCH = 256  # rows decoded together by default (samples do not depend on it): ~1.4x 64's speed on 2 cores
LANES: int | None = None  # decode lanes; None = 2 on the CPU with >= 2 BLAS threads and >= 2 * LANE_MIN_ROWS rows
LANE_MIN_ROWS = 8


@dataclass
class Generations:
    texts: list[list[str]]  # [prompt][sample]
    token_ids: list[list[list[int]]]  # [prompt][sample] -> generated ids (eos excluded)
    finished: list[list[bool]] = field(default_factory=list)  # ended with eos (False = hit max_tokens)
    generated_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0  # prompt tokens run through the model (shared work counted once)
    prefill_seconds: float = 0.0  # of `seconds`, spent on them

    @property
    def tokens_per_sec(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    return len(os.path.commonprefix([list(p) for p in prompts]))


@dataclass
class _Chunk:
    """Keys/values of the middles (prompt[prefix_len:-1]) of some distinct prompts, right-aligned: row j in its last
    len_j columns."""

    keys: list[mx.array | None]  # per layer [n, H, width, D] (None when width == 0)
    values: list[mx.array | None]
    width: int


class _PrefillLayer:
    """Cache protocol of a middles forward: left-padded rows continue the shared prefix (positions P - pad_j + t),
    attending to the prefix's keys/values and causally to their own real tokens."""

    def __init__(self, prefix_k, prefix_v, offset: mx.array, mask: mx.array):
        self.prefix_k, self.prefix_v, self.offset, self.mask = prefix_k, prefix_v, offset, mask
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        if self.prefix_k is None:
            return keys, values
        n = keys.shape[0]
        pk = mx.broadcast_to(self.prefix_k, (n, *self.prefix_k.shape[1:]))
        pv = mx.broadcast_to(self.prefix_v, (n, *self.prefix_v.shape[1:]))
        return mx.concatenate([pk, keys], axis=2), mx.concatenate([pv, values], axis=2)

    def make_mask(self, n: int, **kwargs) -> mx.array:
        return self.mask


class SharedPrefill:
    """Prefills distinct prompts on top of one forward of their common prefix (module docstring)."""

    def __init__(self, model: Any, distinct: Sequence[Sequence[int]]):
        self.model = model
        # the prefix stays inside every prompt[:-1] (the last token is the first decode input)
        self.prefix_len = max(0, min(_common_prefix(distinct), min(len(p) for p in distinct) - 1))
        self.prefix_keys: list[mx.array | None] = [None] * len(model.layers)
        self.prefix_values: list[mx.array | None] = [None] * len(model.layers)
        self.prompt_tokens, self.seconds = 0, 0.0
        if self.prefix_len > 0:
            start = time.perf_counter()
            cache = make_prompt_cache(model)
            model(mx.array([list(distinct[0][: self.prefix_len])]), cache=cache)  # logits never evaluated
            self.prefix_keys = [c.keys[..., : self.prefix_len, :] for c in cache]
            self.prefix_values = [c.values[..., : self.prefix_len, :] for c in cache]
            mx.eval(self.prefix_keys, self.prefix_values)
            self.prompt_tokens += self.prefix_len
            self.seconds += time.perf_counter() - start

    @staticmethod
    def supported(model: Any) -> bool:
        return all(type(c) is KVCache for c in make_prompt_cache(model))

    def chunk(self, prompts: Sequence[Sequence[int]]) -> _Chunk:
        start = time.perf_counter()
        P = self.prefix_len
        middles = [list(p[P:-1]) for p in prompts]
        width = max(len(m) for m in middles)
        if width == 0:
            return _Chunk([None] * len(self.model.layers), [None] * len(self.model.layers), 0)
        pad = np.array([width - len(m) for m in middles])
        tokens = mx.array([[0] * int(k) + m for m, k in zip(middles, pad)])
        t = np.arange(width)
        own = (t[None, :] <= t[:, None])[None] & (
            (t[None, None, :] >= pad[:, None, None]) | (t[None, :, None] < pad[:, None, None])
        )
        mask = np.concatenate([np.ones((len(middles), width, P), dtype=bool), own], axis=2)[:, None]
        offset, mask = mx.array((P - pad).astype(np.int32)), mx.array(mask)
        caches = [_PrefillLayer(k, v, offset, mask) for k, v in zip(self.prefix_keys, self.prefix_values)]
        self.model(tokens, cache=caches)  # only the keys/values are evaluated: no LM head, no last-layer MLP
        keys, values = [c.keys for c in caches], [c.values for c in caches]
        mx.eval(keys, values)
        self.prompt_tokens += sum(len(m) for m in middles)
        self.seconds += time.perf_counter() - start
        return _Chunk(keys, values, width)


class _Slots:
    """Decode state of one lane (module docstring): per layer one [rows, H, P + R, D] key and value buffer, the
    common prefix in columns [0, P), a ring of R columns after it. `col` counts steps (unwrapped); row i's sequence
    occupies ring columns [start[i], col) mod R."""

    def __init__(self, prefill: SharedPrefill, rows: int, ring: int):
        self.prefill, self.P, self.R = prefill, prefill.prefix_len, ring
        self.col = 0
        self.start = np.zeros(rows, dtype=np.int64)
        self.layers = [_SlotLayer(self, i) for i in range(len(prefill.prefix_keys))]
        self.offset = self.mask = None

    def prepare_step(self) -> None:
        col, R = self.col, self.R
        ring_col = col - (col % R - np.arange(R)) % R  # unwrapped column now held by each ring column
        valid = ring_col[None, :] >= self.start[:, None]
        if self.P:
            valid = np.concatenate([np.ones((len(self.start), self.P), dtype=bool), valid], axis=1)
        self.offset = mx.array((self.P + col - self.start).astype(np.int32))
        self.mask = mx.array(valid[:, None, None, :])

    def write(self, rows: np.ndarray, chunk: _Chunk, js: np.ndarray, lengths: np.ndarray) -> None:
        """Put the middle keys/values of chunk rows `js` into decode rows `rows`, right-aligned at col."""
        self.start[rows] = self.col - lengths
        if chunk.width == 0:
            return
        W, R, P = chunk.width, self.R, self.P
        lo = (self.col - W) % R
        segments = [(lo, min(R, lo + W))] + ([(0, lo + W - R)] if lo + W > R else [])
        r, j = mx.array(rows.astype(np.int32)), mx.array(js.astype(np.int32))
        for layer, k, v in zip(self.layers, chunk.keys, chunk.values):
            layer.ensure(k)
            k, v = k[j], v[j]
            done = 0
            for a, b in segments:
                layer.keys[r, :, P + a : P + b, :] = k[:, :, done : done + b - a, :]
                layer.values[r, :, P + a : P + b, :] = v[:, :, done : done + b - a, :]
                done += b - a

    def keep(self, rows: np.ndarray) -> None:
        idx = mx.array(rows.astype(np.int32))
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.start = self.start[rows]


class _SlotLayer:
    """One layer's buffers, used by mlx-lm's attention through its cache protocol."""

    def __init__(self, slots: _Slots, index: int):
        self.slots, self.index = slots, index
        self.keys = self.values = None

    def ensure(self, like: mx.array) -> None:
        if self.keys is not None:
            return
        s = self.slots
        shape = (len(s.start), like.shape[1], s.P + s.R, like.shape[3])
        self.keys, self.values = mx.zeros(shape, like.dtype), mx.zeros(shape, like.dtype)
        if s.P:
            pk, pv = s.prefill.prefix_keys[self.index], s.prefill.prefix_values[self.index]
            self.keys[:, :, : s.P, :] = mx.broadcast_to(pk, (shape[0], *pk.shape[1:]))
            self.values[:, :, : s.P, :] = mx.broadcast_to(pv, (shape[0], *pv.shape[1:]))

    @property
    def offset(self) -> mx.array:
        return self.slots.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.ensure(keys)
        c = self.slots.P + self.slots.col % self.slots.R
        self.keys[..., c : c + 1, :] = keys
        self.values[..., c : c + 1, :] = values
        return self.keys, self.values

    def make_mask(self, n: int, **kwargs) -> mx.array:
        return self.slots.mask


def _lane_count(rows: int, blas_threads: int) -> int:
    if LANES is not None:
        return max(1, min(LANES, rows))
    if mx.default_device().type != mx.cpu or blas_threads < 2 or rows < 2 * LANE_MIN_ROWS:
        return 1
    return 2


class _Lane:
    """Rows of the decode batch decoded by one thread on its own stream (module docstring)."""

    def __init__(self, slots: _Slots, rows: int):
        self.slots = slots
        self.seq_of = np.full(rows, -1, dtype=np.int64)  # sequence in each row (-1: empty)
        self.inputs = np.zeros(rows, dtype=np.int64)  # next input token of each row
        self.count = np.zeros(rows, dtype=np.int64)  # tokens generated by each row's sequence

    def active(self) -> np.ndarray:
        return np.flatnonzero(self.seq_of >= 0)


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 64,
    seed: int = 0,
    batch_size: int = DECODE_BATCH,
    desc: str = "generate",
    fast_exp: bool | None = None,
) -> Generations:
    """Sample `n_samples` responses per prompt (greedy when temperature == 0); see the module docstring.
    fast_exp: None = on when MLX's default device is the CPU."""
    if fast_exp is None:
        fast_exp = mx.default_device().type == mx.cpu
    if mx.default_device().type == mx.cpu:
        keep_freed_memory()
    with fast_exp_ops(model) if fast_exp else nullcontext():
        return _generate(
            model, tokenizer, prompts, n_samples, temperature, top_p, max_tokens, seed, batch_size, desc, fast_exp
        )


def _generate(
    model, tokenizer, prompts, n_samples, temperature, top_p, max_tokens, seed, batch_size, desc, fast_exp
) -> Generations:
    mx.random.seed(seed)
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    n_seq = len(encoded) * n_samples
    tokens: list[list[int]] = [[] for _ in range(n_seq)]
    finished = [False] * n_seq
    start = time.perf_counter()
    if n_seq == 0:
        return Generations([[] for _ in prompts], [[] for _ in prompts], [[] for _ in prompts])
    sampler = make_sampler(temp=temperature, top_p=top_p)
    if not SharedPrefill.supported(model):  # e.g. sliding-window or recurrent caches: mlx-lm's own batching
        return _generate_mlx_lm(model, tokenizer, encoded, n_samples, sampler, max_tokens, batch_size, desc)
    normalize = 0 < top_p < 1  # top-p reads probabilities; argmax and categorical are shift-invariant
    per_sequence = fast_exp and temperature > 0 and not normalize  # inverse CDF on per-sequence uniforms
    eos = {int(t) for t in tokenizer.eos_token_ids}
    prefill = SharedPrefill(model, list(dict.fromkeys(tuple(p) for p in encoded)))

    # sequences in prompt-major order; distinct prompts prefilled PREFILL_BATCH at a time, just ahead of need
    pending: deque = deque()  # (sequence index, chunk, row in chunk, middle length, last prompt token)
    next_prompt = 0

    def fill_queue() -> None:
        nonlocal next_prompt
        group = encoded[next_prompt : next_prompt + PREFILL_BATCH]
        distinct = list(dict.fromkeys(tuple(p) for p in group))
        row = {p: j for j, p in enumerate(distinct)}
        chunk = prefill.chunk(distinct)
        for i, p in enumerate(group):
            for k in range(n_samples):
                middle = len(p) - 1 - prefill.prefix_len
                pending.append(((next_prompt + i) * n_samples + k, chunk, row[tuple(p)], middle, p[-1]))
        next_prompt += len(group)

    ring = max(len(p) for p in encoded) - 1 - prefill.prefix_len + max_tokens  # a sequence never overruns itself
    rows = min(batch_size, n_seq)
    threads, blas = blas_threads()
    # lanes draw in parallel: only where a sequence's draws do not depend on the order of draws (global random state)
    n_lanes = _lane_count(rows, threads) if per_sequence or temperature == 0 else 1
    lanes = [_Lane(_Slots(prefill, len(part), ring), len(part)) for part in np.array_split(np.arange(rows), n_lanes)]
    lock = threading.Lock()  # the pending queue, the prefill, the progress bar
    n_generated = 0

    def place(lane: _Lane, free: np.ndarray) -> None:
        """Start the next pending sequences in rows `free` of `lane` (one batched write per chunk and layer)."""
        with lock:
            taken = []
            for r in free:
                if not pending and next_prompt < len(encoded):
                    fill_queue()
                if not pending:
                    break
                taken.append((r, *pending.popleft()))
        for chunk in {id(t[2]): t[2] for t in taken}.values():
            mine = [t for t in taken if t[2] is chunk]
            lane.slots.write(
                np.array([t[0] for t in mine]), chunk, np.array([t[3] for t in mine]), np.array([t[4] for t in mine])
            )
        for r, s, _, _, _, last in taken:
            lane.seq_of[r], lane.inputs[r], lane.count[r] = s, last, 0

    def step(lane: _Lane) -> list[int]:
        """One decode step of the lane's rows and its sampling: the sampled token of every row."""
        lane.slots.prepare_step()
        logits = model(mx.array(lane.inputs.astype(np.int32))[:, None], cache=lane.slots.layers)[:, -1, :]
        if per_sequence:
            u = sequence_uniforms(seed, np.maximum(lane.seq_of, 0), lane.count)
            sampled = inverse_cdf_sample(logits, mx.array(u), temperature)
        else:
            if normalize:
                logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = sampler(logits)
        out = sampled.tolist()
        lane.slots.col += 1
        return out

    def decode(lane: _Lane, bar) -> None:
        nonlocal n_generated
        place(lane, np.arange(len(lane.seq_of)))
        while len(active := lane.active()):
            sampled = step(lane)
            done = []
            for r in active:
                s, t = lane.seq_of[r], int(sampled[r])
                lane.count[r] += 1
                if t in eos:
                    finished[s] = True
                else:
                    tokens[s].append(t)
                    lane.inputs[r] = t
                if t in eos or lane.count[r] >= max_tokens:
                    lane.seq_of[r] = -1
                    lane.slots.start[r] = lane.slots.col
                    done.append(r)
            with lock:
                n_generated += sum(int(sampled[r]) not in eos for r in active)
                if done:
                    bar.update(len(done))
                    bar.set_postfix(tok_s=f"{n_generated / (time.perf_counter() - start):.0f}")
            if done:
                place(lane, np.array(done))
            active = lane.active()
            if not pending and next_prompt == len(encoded) and 0 < len(active) <= len(lane.seq_of) // 2:
                lane.slots.keep(active)  # the tail: stop computing empty rows
                lane.seq_of, lane.inputs, lane.count = lane.seq_of[active], lane.inputs[active], lane.count[active]

    with tqdm(total=n_seq, desc=desc, unit="seq", dynamic_ncols=True) as bar:
        if n_lanes == 1:
            decode(lanes[0], bar)
        else:
            with blas.limit(limits=max(1, threads // n_lanes)) if blas is not None else nullcontext():
                run_in_threads([lambda lane=lane: decode(lane, bar) for lane in lanes], mx.default_device())
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t) for t in tokens]
    shape = lambda xs: [xs[i * n_samples : (i + 1) * n_samples] for i in range(len(prompts))]  # noqa: E731
    return Generations(
        shape(texts), shape(tokens), shape(finished), n_generated, seconds, prefill.prompt_tokens, prefill.seconds
    )


def _generate_mlx_lm(model, tokenizer, encoded, n_samples, sampler, max_tokens, batch_size, desc) -> Generations:
    """Models whose cache is not a plain KVCache: mlx-lm's BatchGenerator, every sample a separate sequence."""
    flat = [ids for ids in encoded for _ in range(n_samples)]
    gen = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=sampler,
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 32),
    )
    index = {uid: i for i, uid in enumerate(gen.insert(flat, [max_tokens] * len(flat)))}
    tokens: list[list[int]] = [[] for _ in flat]
    finished = [False] * len(flat)
    start = time.perf_counter()
    with gen.stats() as stats, tqdm(total=len(flat), desc=desc, unit="seq", dynamic_ncols=True) as bar:
        while responses := gen.next_generated():
            for r in responses:
                i = index[r.uid]
                if r.finish_reason != "stop":
                    tokens[i].append(int(r.token))
                if r.finish_reason is not None:
                    finished[i] = r.finish_reason == "stop"
                    bar.update(1)
    gen.close()
    n = len(encoded)
    shape = lambda xs: [xs[i * n_samples : (i + 1) * n_samples] for i in range(n)]  # noqa: E731
    return Generations(
        shape([tokenizer.decode(t) for t in tokens]),
        shape(tokens),
        shape(finished),
        sum(len(t) for t in tokens),
        time.perf_counter() - start,
        stats.prompt_tokens,
        stats.prompt_time,
    )
