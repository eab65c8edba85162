"""SFT, reward-model and DPO training steps at the pipeline's shapes on one and two BLAS threads (issue 23).

    python benchmarks/bench_threads.py                 # every step kind at 1 and 2 threads, fresh processes
    python benchmarks/bench_threads.py --kinds dpo --threads 2 --src /tmp/speed-before

Each (kind, threads) runs in its own process with OPENBLAS_NUM_THREADS (and OMP_NUM_THREADS) set, so OpenBLAS starts
with that many threads. Model: the SFT model (models/sft), float32, the pipeline's adapters and batch (the cpu
batch, 8):
  sft     LoRA r 8 / scale 20 on the top 16 blocks, 8 rows of data/tasks/sft_train.jsonl (prompt ~42 tokens + the
          short SFT target), training.sft.nll_loss
  reward  LoRA r 8 on 30 blocks + the LM term (lm_logprob_weight 10), 8 pairs (Stage 2's prompts + synthetic
          completions of ~12 tokens, as in bench_forward_passes.py), training.reward.reward_loss
  dpo     LoRA r 8 / scale 20 on the top 16 blocks, 8 such pairs, training.dpo.make_loss_fn (beta 0.3, sft_weight 2)
Per step: wall and process CPU seconds (best and median of --steps after one warm-up). The 2-thread speed-up is
wall(1) / wall(2) (wall is what two idle cores give; on a shared machine it measures the others too: the load is
recorded). `--fast-ops` runs each step with fast_ops.mlx_exp in place of MLX's exp in SwiGLU and in the
vocabulary log-softmax (differentiable: fast_ops.trainable_swiglu / trainable_logsumexp; patched here, not in the
pipeline) and malloc keeping freed blocks: how much of a step is MLX's single-threaded exp and page faults.
Appends to results/threads.json.
"""

from __future__ import annotations

import argparse
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


def run(src: Path, kind: str, args) -> dict:
    sys.path.insert(0, str(src))
    import mlx.core as mx
    import numpy as np
    from bench_forward_passes import make_pairs

    from dpoflow.core.batching import ChosenRejected, encode_pair, pad_id
    from dpoflow.core.logprobs import reference_logprobs
    from dpoflow.data.tasks import sft_row
    from dpoflow.modeling.loading import load_model
    from dpoflow.modeling.policy import build_policy
    from dpoflow.modeling.reward_model import build_reward_model
    from dpoflow.runtime.params import DpoParams
    from dpoflow.training import dpo, reward, sft
    from dpoflow.training.trainer import TrainConfig, train

    model_dir = HERE.parent / "models/sft"
    if kind == "reward":
        backbone, tok = load_model(model_dir)
        model = build_reward_model(
            backbone, tok, lora_rank=8, lora_layers=30, seed=0, max_seq_len=128, lm_logprob_weight=10.0
        )
    else:
        policy = build_policy(model_dir, "lora", lora_rank=8, lora_scale=20.0, lora_layers=16, seed=0)
        model, tok = policy.model, policy.tokenizer
    pad = pad_id(tok)
    if kind == "sft":
        items = [json.loads(line) for line in (HERE.parent / "data/tasks/sft_train.jsonl").read_text().splitlines()]
        examples = sft.encode_examples(tok, [sft_row(it, SYSTEM) for it in items[:64]], 128)
        batches = [sft.collate(examples[i : i + 8], pad) for i in range(0, 64, 8)]
        loss_fn = sft.nll_loss
        shape = [
            float(np.mean([len(e.prompt_ids) for e in examples])),
            float(np.mean([len(e.completion_ids) for e in examples])),
        ]
    else:
        pairs = make_pairs(tok, 64)
        encoded = [encode_pair(tok, p, 128) for p in pairs]
        order = np.argsort([-e.max_length for e in encoded], kind="stable")
        shape = [
            float(np.mean([len(e.prompt_ids) for e in encoded])),
            float(np.mean([len(e.chosen_ids) for e in encoded])),
        ]
        if kind == "reward":
            batches = [reward.make_batch(encoded, order[i : i + 8], pad) for i in range(0, 64, 8)]
            loss_fn = lambda m, b: reward.reward_loss(m, b, 0.01)  # noqa: E731
        else:
            zero = ChosenRejected(np.zeros(64), np.zeros(64))
            batches = []
            for i in range(0, 64, 8):
                idx = order[i : i + 8]
                sums, _ = reference_logprobs(model, dpo.make_batch(encoded, idx, zero, pad).pairs)
                ref = ChosenRejected(np.asarray(sums[:8]), np.asarray(sums[8:]))
                full = ChosenRejected(np.zeros(64, np.float32), np.zeros(64, np.float32))
                full.chosen[idx], full.rejected[idx] = ref.chosen, ref.rejected
                batches.append(dpo.make_batch(encoded, idx, full, pad))
            loss_fn = dpo.make_loss_fn(DpoParams(beta=0.3, sft_weight=2.0, learning_rate=2.5e-5))
    context = None
    if args.fast_ops:
        import dpoflow.modeling.reward_model as reward_model_module
        from dpoflow.core import logprobs
        from dpoflow.modeling.fast_ops import keep_freed_memory, mlx_exp_training_ops, trainable_logsumexp

        def fast_logprobs(logits, target_ids):
            target = mx.take_along_axis(logits, target_ids[:, None], axis=-1).squeeze(-1)
            return target - trainable_logsumexp(logits)

        logprobs.logprobs_from_logits = fast_logprobs
        reward_model_module.logprobs_from_logits = fast_logprobs
        keep_freed_memory()
        context = mlx_exp_training_ops(model)
        context.__enter__()
    marks, walls = [time.process_time()], [time.perf_counter()]
    train(
        model,
        loss_fn,
        lambda step, micro: batches[step % len(batches)],
        TrainConfig(
            steps=args.steps + 1, learning_rate=2.5e-5, max_grad_norm=1.0, seed=0, desc=f"{kind} x{common.threads()}"
        ),
        on_step=lambda step, m: (marks.append(time.process_time()), walls.append(time.perf_counter())),
    )
    if context is not None:
        context.__exit__(None, None, None)
    cpu, wall = np.diff(marks)[1:], np.diff(walls)[1:]
    return {
        "kind": kind,
        "threads": common.threads(),
        "fast_ops": args.fast_ops,
        "src": str(src),
        "shape_prompt_completion": shape,
        "wall_best": float(wall.min()),
        "wall_median": float(np.median(wall)),
        "cpu_best": float(cpu.min()),
        "cpu_median": float(np.median(cpu)),
        "wall_all": wall.tolist(),
        "cpu_all": cpu.tolist(),
        "gemm_gflops": common.gemm_gflops_mlx(),
        "load": common.cpu_load(),
        "mlx": mx.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=HERE.parent)
    ap.add_argument("--kinds", default="sft,reward,dpo")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after 1 warm-up)")
    ap.add_argument("--fast-ops", action="store_true", help="mlx_exp in SwiGLU and the log-softmax (see docstring)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one kind in this process
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run(args.src, args.one, args)), flush=True)
        return
    path = common.RESULTS / "threads.json"
    runs = common.previous_runs(path)
    for kind in args.kinds.split(","):
        for n in args.threads.split(","):
            env = {**os.environ, "BENCH_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_NUM_THREADS": n}
            cmd = [sys.executable, __file__, "--one", kind, "--src", str(args.src), "--steps", str(args.steps)]
            out = subprocess.run(
                cmd + (["--fast-ops"] if args.fast_ops else []), env=env, capture_output=True, text=True
            )
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                raise SystemExit(out.stderr[-3000:])
            r = json.loads(line[0][7:])
            print(
                kind, n, "threads:", {k: round(r[k], 3) for k in ("wall_best", "wall_median", "cpu_best", "cpu_median")}
            )
            runs.append(r)
            common.write_result(path.stem, {"runs": runs})


if __name__ == "__main__":
    main()
