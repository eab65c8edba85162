"""Stage 2's sampling, end to end, for one or two dpoflow checkouts in the same run (issue 23).

    python benchmarks/bench_sampling.py --alternate /tmp/speed-before            # before/after, alternating
    BENCH_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_sampling.py --alternate ...
    python benchmarks/bench_sampling.py --lanes 1 --batch 128                    # this checkout, one setting

Workload: `dpoflow.modeling.generation.generate` on Stage 2's first `--prompts` prompts (data/tasks/
pref_prompts.jsonl, params.yaml's system prompt) x `--samples` samples, T `--temperature`, `--max-tokens` new tokens,
`--batch` sequences decoded together, the SFT model (models/sft) - Stage 2's setting by default (64 x 4, T 0.9, 16
tokens, batch 64). Reported per run: generated tokens, wall seconds and tok/s, process CPU seconds (all threads) and
tokens per CPU-second, prefill seconds, and a hash of every sampled id (`tokens_sha`: equal hashes = the same tokens).
On a machine shared with other work wall time measures the others too: tokens per CPU-second is the comparison that
survives, and `2 x tok/CPU-s` bounds what two idle cores could reach. Appends to results/sampling[_t1].json
(--alternate starts it afresh).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SYSTEM = "Reply with only the final answer, no explanation."


def run(src: Path, label: str, args) -> dict:
    sys.path.insert(0, str(src))
    import mlx.core as mx
    import numpy as np

    import dpoflow.modeling.generation as G
    from dpoflow.data.tasks import item_prompt
    from dpoflow.modeling.loading import load_model

    assert Path(G.__file__).resolve().is_relative_to(src.resolve()), G.__file__
    if args.lanes is not None:
        if not hasattr(G, "LANES"):
            raise SystemExit(f"{src}: this checkout has no decode lanes (--lanes)")
        G.LANES = args.lanes
    model, tok = load_model(HERE.parent / args.model)
    items = [json.loads(line) for line in (HERE.parent / "data/tasks/pref_prompts.jsonl").read_text().splitlines()]
    prompts = [item_prompt(it, SYSTEM) for it in items[args.offset : args.offset + args.prompts]]
    kw = dict(n_samples=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, batch_size=args.batch)
    G.generate(model, tok, prompts[:8], **{**kw, "max_tokens": 4, "seed": 1})  # warm-up (compiles)
    runs = []
    for _ in range(args.repeats):
        c, w = time.process_time(), time.perf_counter()
        g = G.generate(model, tok, prompts, seed=args.seed, **kw)
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        runs.append(
            {
                "generated_tokens": g.generated_tokens,
                "wall_seconds": wall,
                "tokens_per_sec": g.generated_tokens / wall,
                "cpu_seconds": cpu,
                "tokens_per_cpu_second": g.generated_tokens / cpu,
                "prefill_seconds": g.prefill_seconds,
                "prompt_tokens": g.prompt_tokens,
                "mean_tokens_per_sequence": g.generated_tokens / (len(prompts) * args.samples),
                "finished_fraction": float(np.mean([f for p in g.finished for f in p])),
                "tokens_sha": hashlib.sha256(json.dumps(g.token_ids).encode()).hexdigest()[:16],
            }
        )
        print(label, json.dumps(runs[-1]), flush=True)
    best = max(runs, key=lambda r: r["tokens_per_cpu_second"])
    out = {
        "label": label,
        "src": str(src),
        "commit": common.checkout_commit(src),
        "threads": common.threads(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "lanes": getattr(G, "LANES", None) if args.lanes is not None else "auto",
        "workload": {
            "model": args.model,
            "prompts": args.prompts,
            "offset": args.offset,
            "samples": args.samples,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "batch": args.batch,
            "seed": args.seed,
        },
        "runs": runs,
        "best_tokens_per_cpu_second": best["tokens_per_cpu_second"],
        "best_tokens_per_sec": max(r["tokens_per_sec"] for r in runs),
        "tokens_sha": runs[0]["tokens_sha"],
        "mlx": mx.__version__,
        "gemm_gflops": common.gemm_gflops_mlx(),
        "load": common.cpu_load(),
    }
    path = common.RESULTS / f"{args.name}{common.suffix()}.json"
    previous = common.previous_runs(path)
    print(common.write_result(path.stem, {"runs": previous + [out]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=HERE.parent, help="dpoflow checkout whose generation code runs")
    ap.add_argument("--label", default="current")
    ap.add_argument("--alternate", type=Path, help="a 'before' checkout: run it and this one, alternating")
    ap.add_argument("--rounds", type=int, default=2, help="with --alternate: before/after pairs of processes")
    ap.add_argument("--model", default="models/sft")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--offset", type=int, default=0, help="first prompt of data/tasks/pref_prompts.jsonl")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lanes", type=int, default=None, help="force generation.LANES (new code only)")
    ap.add_argument("--repeats", type=int, default=1, help="timed generate calls per process")
    ap.add_argument("--name", default="sampling", help="results file stem")
    args = ap.parse_args()
    if args.alternate:  # fresh processes: each checkout's modules imported once
        me = [sys.executable, __file__, "--model", args.model, "--name", args.name, "--repeats", str(args.repeats)]
        for flag in ("prompts", "offset", "samples", "temperature", "max_tokens", "batch", "seed"):
            me += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        lanes = [] if args.lanes is None else ["--lanes", str(args.lanes)]  # the current checkout only
        (common.RESULTS / f"{args.name}{common.suffix()}.json").unlink(missing_ok=True)
        for _ in range(args.rounds):
            subprocess.run(me + ["--src", str(args.alternate), "--label", "before"], check=True)
            subprocess.run(me + lanes + ["--src", str(args.src), "--label", "current"], check=True)
        return
    run(args.src, args.label, args)


if __name__ == "__main__":
    main()
