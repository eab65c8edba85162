"""Where Stage 2's sampling loop spends its time, and a before/after of two dpoflow checkouts on the same workload.

    python benchmarks/profile_generation_loop.py                          # this checkout, label "current"
    git worktree add /tmp/before <commit>
    python benchmarks/profile_generation_loop.py --src /tmp/before --label before
    python benchmarks/profile_generation_loop.py --alternate /tmp/before  # both, alternating, in one command

Loop: `dpoflow.modeling.generation.generate` on Stage 2's first `--prompts` prompts x `--samples` samples (T 0.9,
16 tokens,
batch 64, the SFT model), with timers around the prefill chunks and the model's decode step (evaluated on its own
here, so the sampler and the Python bookkeeping are the rest). `tokens_sha` hashes every sampled id: two checkouts
with the same hash sampled exactly the same tokens.
Step: one decode step in the decode slots with the rows' starts spread over 20 columns (masked keys, as in the
loop), with every start at 0 (nothing masked), and in mlx-lm's KVCache at the same context (best of 5, 4 rounds
alternated). A masked step slower than an unmasked one is the subnormal-weights cost that poly_exp's flush removed.
Appends to results/generation_loop[_t1].json (--alternate starts it afresh).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402


def run(src: Path, label: str, args) -> dict:
    sys.path.insert(0, str(src))
    import mlx.core as mx
    import numpy as np
    from bench_generation import (  # best of 5, CPU ms at 1 thread (imported after src: it imports dpoflow)
        SYSTEM,
        best_ms,
    )
    from mlx_lm.models.cache import make_prompt_cache

    import dpoflow.modeling.generation as G
    from dpoflow.data.tasks import item_prompt
    from dpoflow.modeling.loading import load_model

    assert Path(G.__file__).resolve().is_relative_to(src.resolve()), G.__file__
    clock = time.process_time if common.threads() == 1 else time.perf_counter
    model, tok = load_model(HERE.parent / args.model)
    timers: dict[str, float] = {"prefill_chunks": 0.0, "decode_model": 0.0}
    steps = [0]

    chunk = G.SharedPrefill.chunk

    def timed_chunk(self, prompts):
        t = clock()
        out = chunk(self, prompts)
        timers["prefill_chunks"] += clock() - t
        return out

    model_call = type(model).__call__

    def timed_call(self, inputs, cache=None, **kw):
        out = model_call(self, inputs, cache=cache, **kw)
        if cache and isinstance(cache[0], G._SlotLayer):
            t = clock()
            mx.eval(out)
            timers["decode_model"] += clock() - t
            steps[0] += 1
        return out

    items = [json.loads(line) for line in (HERE.parent / "data/tasks/pref_prompts.jsonl").read_text().splitlines()]
    prompts = [item_prompt(it, SYSTEM) for it in items[: args.prompts]]
    kw = dict(n_samples=args.samples, temperature=0.9, max_tokens=16, batch_size=args.batch, seed=0)
    G.generate(model, tok, prompts[:4], **{**kw, "max_tokens": 4})  # warm-up (compiles)
    G.SharedPrefill.chunk, type(model).__call__ = timed_chunk, timed_call
    t = clock()
    g = G.generate(model, tok, prompts, **kw)
    total = clock() - t
    G.SharedPrefill.chunk, type(model).__call__ = chunk, model_call
    loop = {
        "seconds": total,
        "generated_tokens": g.generated_tokens,
        "tokens_per_sec": g.generated_tokens / total,
        "decode_steps": steps[0],
        **timers,
        "rest": total - timers["prefill_chunks"] - timers["decode_model"],
        "decode_model_ms_per_step": 1000 * timers["decode_model"] / max(steps[0], 1),
        "tokens_sha": hashlib.sha256(json.dumps(g.token_ids).encode()).hexdigest()[:16],
    }
    print(label, json.dumps(loop), flush=True)

    B, context, capacity = args.batch, 60, 140
    x = mx.zeros((B, 1), dtype=mx.int32)
    step: dict[str, list[float]] = {"slots_masked": [], "slots_unmasked": [], "kvcache": []}
    with G.fast_exp_ops(model):
        cache = make_prompt_cache(model)
        model(mx.random.randint(0, 1000, (B, context)), cache=cache)
        mx.eval([c.state for c in cache])

        def kv_step():
            mx.eval(model(x, cache=cache))
            for c in cache:
                c.trim(1)

        slots = G._Slots(len(model.layers), B, col=context, capacity=capacity)
        a = model.args
        shape = (B, a.num_key_value_heads, capacity, a.hidden_size // a.num_attention_heads)
        for layer in slots.layers:
            layer.keys, layer.values = (mx.random.normal(shape) for _ in range(2))
            mx.eval(layer.keys, layer.values)

        def slot_step():
            slots.prepare_step()
            mx.eval(model(x, cache=slots.layers))

        spread = np.random.default_rng(0).integers(0, 20, B)
        for _ in range(4):
            step["kvcache"].append(best_ms(kv_step))
            slots.start[:] = spread
            step["slots_masked"].append(best_ms(slot_step))
            slots.start[:] = 0
            step["slots_unmasked"].append(best_ms(slot_step))
    deep = G.poly_exp(mx.linspace(-100, -80, 20_001))
    out = {
        "label": label,
        "src": str(src),
        "commit": common.checkout_commit(src),
        "threads": common.threads(),
        "workload": {"model": args.model, "prompts": args.prompts, "samples": args.samples, "batch": args.batch},
        "loop": loop,
        "step_ms": step,
        "step_ms_best": {k: min(v) for k, v in step.items()},
        "poly_exp_subnormal_outputs": int(((deep > 0) & (deep < 2.0**-126)).sum().item()),
        "load": common.cpu_load(),
    }
    print(label, json.dumps(out["step_ms_best"]), flush=True)
    path = common.RESULTS / f"generation_loop{common.suffix()}.json"
    runs = common.previous_runs(path)
    print(common.write_result(path.stem, {"runs": runs + [out]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=HERE.parent, help="dpoflow checkout whose generation code runs")
    ap.add_argument("--label", default="current")
    ap.add_argument("--alternate", type=Path, help="a 'before' checkout: run it and this one, twice, alternating")
    ap.add_argument("--model", default="models/sft")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if args.alternate:  # fresh processes: each checkout's modules imported once
        me = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--prompts",
            str(args.prompts),
            "--samples",
            str(args.samples),
            "--batch",
            str(args.batch),
        ]
        (common.RESULTS / f"generation_loop{common.suffix()}.json").unlink(missing_ok=True)
        for _ in range(2):
            subprocess.run(me + ["--src", str(args.alternate), "--label", "before"], check=True)
            subprocess.run(me + ["--src", str(args.src), "--label", "current"], check=True)
        return
    run(args.src, args.label, args)


if __name__ == "__main__":
    main()
