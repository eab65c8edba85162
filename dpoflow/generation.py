"""Batched sampling with mlx-lm's continuous-batching generator, seeded, with a progress bar.

One call generates `n_samples` responses for each prompt (conversation messages) and reports throughput, so
Stage 1 (validation accuracy), Stage 2 (K samples per prompt), Stage 3/5 (KL samples), 6 and 7 share it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

from dpoflow.batching import encode_prompt


@dataclass
class Generations:
    texts: list[list[str]]                  # [prompt][sample]
    token_ids: list[list[list[int]]]        # [prompt][sample] -> generated ids (eos excluded)
    finished: list[list[bool]] = field(default_factory=list)  # ended with eos (False = hit max_tokens)
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_sec(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


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
) -> Generations:
    """Sample `n_samples` responses per prompt (greedy when temperature == 0)."""
    mx.random.seed(seed)
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    flat = [ids for ids in encoded for _ in range(n_samples)]
    sampler = make_sampler(temp=temperature, top_p=top_p)
    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=sampler, completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 32))
    uids = gen.insert(flat, [max_tokens] * len(flat))
    index = {uid: i for i, uid in enumerate(uids)}
    tokens: list[list[int]] = [[] for _ in flat]
    finished = [False] * len(flat)
    n_generated = 0
    start = time.perf_counter()
    with tqdm(total=len(flat), desc=desc, unit="seq", dynamic_ncols=True) as bar:
        while responses := gen.next_generated():
            for r in responses:
                i = index[r.uid]
                if r.finish_reason != "stop":
                    tokens[i].append(int(r.token))
                    n_generated += 1
                if r.finish_reason is not None:
                    finished[i] = r.finish_reason == "stop"
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{n_generated / (time.perf_counter() - start):.0f}")
    gen.close()
    seconds = time.perf_counter() - start
    texts = [tokenizer.decode(t) for t in tokens]
    shape = lambda xs: [xs[i * n_samples:(i + 1) * n_samples] for i in range(len(prompts))]  # noqa: E731
    return Generations(shape(texts), shape(tokens), shape(finished), n_generated, seconds)
