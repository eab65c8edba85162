"""Batched sampling with mlx-lm's continuous-batching generator, seeded, with a progress bar.

One call generates `n_samples` responses for each prompt (conversation messages) and reports throughput, so
Stage 1 (validation accuracy), Stage 2 (K samples per prompt), Stage 3/5 (KL samples), 6 and 7 share it.

Shared prefill: the K samples of a prompt, and all prompts' common prefix (the chat template's system turn),
are run through the model once, not once per sequence:

    prefix  = longest common prefix of the distinct prompts   -> one forward (batch 1), KV cache C_0
    middle  = prompt[len(prefix):-1], per DISTINCT prompt      -> batched forward on copies of C_0 -> C_p
    sample k of prompt p = BatchGenerator sequence whose prompt is only the last token, starting from C_p
                           (the K sequences share the same cache objects; the generator copies them on merge)

Prompts are prefilled chunk by chunk, just ahead of the decoder, so the caches waiting in the queue stay a few
batches' worth. Sequences enter the generator in the same order as without sharing (prompt-major), so the decode
schedule is the same; greedy output equals the unshared path (tests/test_generation.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, PromptProcessingBatch
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from dpoflow.batching import encode_prompt

PREFILL_BATCH = 32  # distinct prompts prefilled together


@dataclass
class Generations:
    texts: list[list[str]]                  # [prompt][sample]
    token_ids: list[list[list[int]]]        # [prompt][sample] -> generated ids (eos excluded)
    finished: list[list[bool]] = field(default_factory=list)  # ended with eos (False = hit max_tokens)
    generated_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0                  # tokens actually run through the model before decoding
    prefill_seconds: float = 0.0            # of `seconds`, spent on those prompt tokens

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


class SharedPrefill:
    """KV caches of prompt[:-1] for distinct prompts, computed on top of one cache of their common prefix."""

    def __init__(self, model: Any, distinct: Sequence[Sequence[int]], batch: int = PREFILL_BATCH):
        self.model, self.batch = model, batch
        # keep >= 1 middle token per prompt (the last token is fed by the generator)
        self.prefix_len = max(0, min(_common_prefix(distinct), min(len(p) for p in distinct) - 2))
        self.prefix = None
        self.prompt_tokens, self.seconds = 0, 0.0
        if self.prefix_len > 0:
            start = time.perf_counter()
            self.prefix = make_prompt_cache(model)
            model(mx.array([list(distinct[0][:self.prefix_len])]), cache=self.prefix)
            mx.eval([c.state for c in self.prefix])
            self.prompt_tokens += self.prefix_len
            self.seconds += time.perf_counter() - start

    @staticmethod
    def supported(model: Any) -> bool:
        return all(type(c) is KVCache for c in make_prompt_cache(model))

    def caches(self, prompts: Sequence[Sequence[int]]) -> list[Optional[list[Any]]]:
        """One cache list per prompt holding prompt[:-1] (None for a one-token prompt: the generator's own)."""
        start = time.perf_counter()
        middles = [list(p[self.prefix_len:-1]) for p in prompts]
        out: list[Optional[list[Any]]] = [None] * len(prompts)
        todo = [i for i, m in enumerate(middles) if m]
        for s in range(0, len(todo), self.batch):
            idx = todo[s:s + self.batch]
            base = [self.prefix if self.prefix is not None else make_prompt_cache(self.model) for _ in idx]
            batch = PromptProcessingBatch(self.model, list(range(len(idx))), base, prefill_step_size=2048)
            batch.prompt([middles[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = batch.extract_cache(j)
            mx.eval([c.state[:2] for i in idx for c in out[i]])
            self.prompt_tokens += sum(len(middles[i]) for i in idx)
        self.seconds += time.perf_counter() - start
        return out


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
    share_prefill: bool = True,
) -> Generations:
    """Sample `n_samples` responses per prompt (greedy when temperature == 0).

    share_prefill=False runs every sequence's whole prompt through the model (mlx-lm's plain path: the same
    outputs, K times the prompt work); kept for comparison, and used for models whose cache is not a KVCache."""
    mx.random.seed(seed)
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    flat = [ids for ids in encoded for _ in range(n_samples)]
    sampler = make_sampler(temp=temperature, top_p=top_p)
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=sampler, completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 32))
    tokens: list[list[int]] = [[] for _ in flat]
    finished = [False] * len(flat)
    index: dict[int, int] = {}  # generator uid -> flat position (prompt-major, as `flat`)
    start = time.perf_counter()
    prefill = None
    if share_prefill and flat and SharedPrefill.supported(model):
        prefill = SharedPrefill(model, list(dict.fromkeys(tuple(p) for p in encoded)))
    next_prompt = 0

    def feed(n_done: int) -> None:
        """Insert the next prompts' sequences while fewer than 2 * batch_size are unfinished, so the queue
        behind the running batch never runs dry (the decode schedule then equals inserting all at once)."""
        nonlocal next_prompt
        while next_prompt < len(encoded) and len(index) - n_done < 2 * batch_size:
            group = encoded[next_prompt:next_prompt + PREFILL_BATCH]
            distinct = list(dict.fromkeys(tuple(p) for p in group))
            caches = dict(zip(distinct, prefill.caches(distinct)))
            seqs = [p for p in group for _ in range(n_samples)]
            uids = gen.insert([p[-1:] for p in seqs], [max_tokens] * len(seqs),
                              caches=[caches[tuple(p)] for p in seqs])
            base = len(index)
            index.update({uid: base + j for j, uid in enumerate(uids)})
            next_prompt += len(group)

    if prefill is None:
        index.update({uid: i for i, uid in enumerate(gen.insert(flat, [max_tokens] * len(flat)))})
    n_generated = n_done = 0
    with gen.stats() as stats, tqdm(total=len(flat), desc=desc, unit="seq", dynamic_ncols=True) as bar:
        if prefill is not None:
            feed(0)
        while responses := gen.next_generated():
            for r in responses:
                i = index[r.uid]
                if r.finish_reason != "stop":
                    tokens[i].append(int(r.token))
                    n_generated += 1
                if r.finish_reason is not None:
                    finished[i] = r.finish_reason == "stop"
                    n_done += 1
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{n_generated / (time.perf_counter() - start):.0f}")
            if prefill is not None:
                feed(n_done)
    gen.close()
    seconds = time.perf_counter() - start
    prompt_tokens = stats.prompt_tokens + (prefill.prompt_tokens if prefill else 0)
    prefill_seconds = stats.prompt_time + (prefill.seconds if prefill else 0.0)
    texts = [tokenizer.decode(t) for t in tokens]
    shape = lambda xs: [xs[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]  # noqa: E731
    return Generations(shape(texts), shape(tokens), shape(finished), n_generated, seconds, prompt_tokens,
                       prefill_seconds)
