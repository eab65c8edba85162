"""Batched sampling for every stage (Stage 1 validation, Stage 2's K samples per prompt, KL samples, 6, 7), seeded,
with a progress bar and throughput figures.

Two things make it fast on a CPU, where a small model's decode step costs about as much as a prompt token:

Shared prefill. The K samples of a prompt and all prompts' common prefix (the chat template's system turn) run
through the model once, not once per sequence:
    prefix  = longest common prefix of the distinct prompts        -> one forward (batch 1)
    middle  = prompt[len(prefix):-1] of each DISTINCT prompt       -> batched forwards (PREFILL_BATCH prompts) on
                                                                      copies of the prefix's keys/values
    a sequence = (prompt p, sample k): starts from p's keys/values; its first input is p's last token

Fixed decode slots. B sequences decode together; every layer keeps keys/values in one [B, H, capacity, D] buffer
per layer, all rows writing the same column per step (row i's sequence occupies columns [start_i, col), masked
outside; its positions for RoPE are col - start_i). A finished sequence's row is refilled in place with the next
sequence's prompt keys/values (written right-aligned at `col`): no per-finish gather or per-join concatenation of
every layer's cache (what mlx-lm's BatchGenerator does, which costs several decode steps each time).

Fast exp (on by default on the CPU device). MLX's CPU `exp` is a scalar loop (~35 ns per float here, numpy's ~0.35),
so the SwiGLU sigmoid and the attention softmax are about half of a 2-thread decode step (benchmarks/RESULTS.md,
"Decode step op by op"). While `generate` runs, the model's own module gets a polynomial exp (max relative error
~8e-6) in its `swiglu` and in the decode step's attention, and temperature sampling draws by inverse CDF on
fast-exp weights (one uniform per row instead of mlx's V Gumbels). Logits move by ~1e-4; samples are those of the
same distribution but not bit-identical to mlx-lm's, so `fast_exp=False` keeps the stock ops (Metal and CUDA keep
them by default: the polynomial was measured on this CPU only).

Greedy output equals mlx-lm's batch generation with `fast_exp=False` (tests/test_generation.py); sampling is
deterministic for a seed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from dpoflow.core.batching import encode_prompt
from dpoflow.modeling.fast_ops import fast_categorical_sampler, fast_exp_ops

PREFILL_BATCH = 32  # distinct prompts prefilled together


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
    first, n = prompts[0], min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return n


@dataclass
class _Chunk:
    """Keys/values of prompt[:-1] for some distinct prompts, right-aligned: row j in its last len_j - 1 columns."""

    keys: list[mx.array | None]  # per layer [n, H, width, D] (None when width == 0)
    values: list[mx.array | None]
    width: int


class SharedPrefill:
    """Prefills distinct prompts on top of one cache of their common prefix (module docstring)."""

    def __init__(self, model: Any, distinct: Sequence[Sequence[int]]):
        self.model = model
        # the prefix stays inside every prompt[:-1] (the last token is the first decode input)
        self.prefix_len = max(0, min(_common_prefix(distinct), min(len(p) for p in distinct) - 1))
        self.prefix = None
        self.prompt_tokens, self.seconds = 0, 0.0
        if self.prefix_len > 0:
            start = time.perf_counter()
            self.prefix = make_prompt_cache(model)
            model(mx.array([list(distinct[0][: self.prefix_len])]), cache=self.prefix)
            mx.eval([c.state for c in self.prefix])
            self.prompt_tokens += self.prefix_len
            self.seconds += time.perf_counter() - start

    @staticmethod
    def supported(model: Any) -> bool:
        return all(type(c) is KVCache for c in make_prompt_cache(model))

    def chunk(self, prompts: Sequence[Sequence[int]]) -> _Chunk:
        start = time.perf_counter()
        n = len(prompts)
        middles = [list(p[self.prefix_len : -1]) for p in prompts]
        if self.prefix is not None:
            caches = [BatchKVCache.merge([c] * n) for c in self.prefix]
        else:
            caches = [BatchKVCache([0] * n) for _ in self.model.layers]
        width = max(len(m) for m in middles)
        if width:
            pad = [width - len(m) for m in middles]
            tokens = mx.array([m + [0] * p for m, p in zip(middles, pad)])
            for c in caches:
                c.step = width  # grow by exactly the middles (mlx-lm's 256 spare columns made finalize's roll 6x wider)
                c.prepare(lengths=[len(m) for m in middles], right_padding=pad)
            self.model(tokens, cache=caches)
            for c in caches:
                c.finalize()
            self.prompt_tokens += sum(len(m) for m in middles)
        size = caches[0].size()
        keys = [c.keys[..., :size, :] if size else None for c in caches]
        values = [c.values[..., :size, :] if size else None for c in caches]
        mx.eval([a for a in keys + values if a is not None])
        self.seconds += time.perf_counter() - start
        return _Chunk(keys, values, size)


class _Slots:
    """Decode state shared by the layers: row i's sequence occupies columns [start[i], col) of every buffer."""

    def __init__(self, n_layers: int, rows: int, col: int, capacity: int):
        self.col, self.capacity = col, capacity
        self.start = np.full(rows, col, dtype=np.int64)
        self.layers = [_SlotLayer(self) for _ in range(n_layers)]
        self.offset = self.mask = None

    def prepare_step(self) -> None:
        self.offset = mx.array((self.col - self.start).astype(np.int32))
        valid = np.arange(self.col + 1)[None, :] >= self.start[:, None]
        self.mask = mx.array(valid[:, None, None, :])

    def write(self, rows: np.ndarray, chunk: _Chunk, js: np.ndarray, lengths: np.ndarray) -> None:
        """Put the prompt keys/values of chunk rows `js` into decode rows `rows`, right-aligned at col."""
        self.start[rows] = self.col - lengths
        if chunk.width == 0:
            return
        r, j, lo = mx.array(rows.astype(np.int32)), mx.array(js.astype(np.int32)), self.col - chunk.width
        for layer, k, v in zip(self.layers, chunk.keys, chunk.values):
            layer.ensure(k)
            layer.keys[r, :, lo : self.col, :] = k[j]
            layer.values[r, :, lo : self.col, :] = v[j]

    def make_room(self, need: int) -> None:
        """Before writing column col: shift every row left (or grow) so that col < capacity, keeping `need`
        columns before col for right-aligned prompt writes."""
        if self.col < self.capacity:
            return
        shift = int(max(0, min(self.start.min(), self.col - need)))
        if self.col - shift >= self.capacity * 3 // 4:  # little to reclaim (long sequences): grow instead
            self.capacity = self.col - shift + self.capacity // 2
        for layer in self.layers:
            layer.shift(shift, self.capacity)
        self.col -= shift
        self.start -= shift

    def keep(self, rows: np.ndarray) -> None:
        idx = mx.array(rows.astype(np.int32))
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
        self.start = self.start[rows]


class _SlotLayer:
    """One layer's buffers, used by mlx-lm's attention through its cache protocol."""

    def __init__(self, slots: _Slots):
        self.slots = slots
        self.keys = self.values = None

    def ensure(self, like: mx.array) -> None:
        if self.keys is None:
            shape = (len(self.slots.start), like.shape[1], self.slots.capacity, like.shape[3])
            self.keys, self.values = mx.zeros(shape, like.dtype), mx.zeros(shape, like.dtype)

    def shift(self, shift: int, capacity: int) -> None:
        if self.keys is None:
            return
        col = self.slots.col
        k, v = self.keys[..., shift:col, :], self.values[..., shift:col, :]
        pad = [(0, 0), (0, 0), (0, capacity - (col - shift)), (0, 0)]
        self.keys, self.values = mx.pad(k, pad), mx.pad(v, pad)

    @property
    def offset(self) -> mx.array:
        return self.slots.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.ensure(keys)
        col = self.slots.col
        self.keys[..., col : col + 1, :] = keys
        self.values[..., col : col + 1, :] = values
        return self.keys[..., : col + 1, :], self.values[..., : col + 1, :]

    def make_mask(self, n: int, **kwargs) -> mx.array:
        return self.slots.mask


def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    desc: str = "generate",
    fast_exp: bool | None = None,
) -> Generations:
    """Sample `n_samples` responses per prompt (greedy when temperature == 0); see the module docstring.
    fast_exp: None = on when MLX's default device is the CPU."""
    if fast_exp is None:
        fast_exp = mx.default_device().type == mx.cpu
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
    if fast_exp and temperature > 0 and not normalize:
        sampler = fast_categorical_sampler(temperature)
    eos = {int(t) for t in tokenizer.eos_token_ids}
    prefill = SharedPrefill(model, list(dict.fromkeys(tuple(p) for p in encoded)))

    # sequences in prompt-major order; distinct prompts prefilled PREFILL_BATCH at a time, just ahead of need
    pending: deque = deque()  # (sequence index, chunk, row in chunk, prompt[:-1] length, last prompt token)
    next_prompt = 0

    def fill_queue() -> None:
        nonlocal next_prompt
        group = encoded[next_prompt : next_prompt + PREFILL_BATCH]
        distinct = list(dict.fromkeys(tuple(p) for p in group))
        row = {p: j for j, p in enumerate(distinct)}
        chunk = prefill.chunk(distinct)
        for i, p in enumerate(group):
            for k in range(n_samples):
                pending.append(((next_prompt + i) * n_samples + k, chunk, row[tuple(p)], len(p) - 1, p[-1]))
        next_prompt += len(group)

    width = max(len(p) for p in encoded) - 1  # widest prompt[:-1]: right-aligned writes need this room before col
    rows = min(batch_size, n_seq)
    slots = _Slots(len(model.layers), rows, col=width, capacity=width + max_tokens + 64)
    seq_of = np.full(rows, -1, dtype=np.int64)  # sequence in each decode row (-1: empty)
    inputs = np.zeros(rows, dtype=np.int64)  # next input token of each row
    count = np.zeros(rows, dtype=np.int64)  # tokens generated by each row's sequence

    def place(free: np.ndarray) -> None:
        """Start the next pending sequences in rows `free` (one batched write per chunk and layer)."""
        taken = []
        for r in free:
            if not pending and next_prompt < len(encoded):
                fill_queue()
            if not pending:
                break
            taken.append((r, *pending.popleft()))
        for chunk in {id(t[2]): t[2] for t in taken}.values():
            mine = [t for t in taken if t[2] is chunk]
            slots.write(
                np.array([t[0] for t in mine]), chunk, np.array([t[3] for t in mine]), np.array([t[4] for t in mine])
            )
        for r, s, _, _, _, last in taken:
            seq_of[r], inputs[r], count[r] = s, last, 0

    n_generated = 0
    with tqdm(total=n_seq, desc=desc, unit="seq", dynamic_ncols=True) as bar:
        place(np.arange(rows))
        while (seq_of >= 0).any():
            slots.make_room(width)
            slots.prepare_step()
            logits = model(mx.array(inputs.astype(np.int32))[:, None], cache=slots.layers)[:, -1, :]
            if normalize:
                logits = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sampled = sampler(logits).tolist()
            slots.col += 1
            done = []
            for r, s in enumerate(seq_of):
                if s < 0:
                    continue
                t = int(sampled[r])
                count[r] += 1
                if t in eos:
                    finished[s] = True
                else:
                    tokens[s].append(t)
                    n_generated += 1
                    inputs[r] = t
                if t in eos or count[r] >= max_tokens:
                    seq_of[r] = -1
                    slots.start[r] = slots.col
                    done.append(r)
            if done:
                bar.update(len(done))
                bar.set_postfix(tok_s=f"{n_generated / (time.perf_counter() - start):.0f}")
                place(np.array(done))
            active = np.flatnonzero(seq_of >= 0)
            if not pending and next_prompt == len(encoded) and 0 < len(active) <= len(seq_of) // 2:
                slots.keep(active)  # the tail: stop computing empty rows
                seq_of, inputs, count = seq_of[active], inputs[active], count[active]
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
