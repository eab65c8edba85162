"""Where a dpoflow Stage 5 step's CPU time goes (1 thread recommended: BENCH_THREADS=1 OPENBLAS_NUM_THREADS=1).

    python benchmarks/profile_dpo_step.py --shape 32+32 --finetune lora

Phases, each evaluated on its own (process CPU seconds, best of --repeats): forward (loss), forward+backward
(value_and_grad), gradient clipping, AdamW update; for the shared-prompt and the [2B, T] forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from dpoflow.core import logprobs as lp  # noqa: E402
from dpoflow.core.batching import EncodedPair  # noqa: E402
from dpoflow.core.batching import pad_id as pad_id_of
from dpoflow.modeling.policy import build_policy  # noqa: E402
from dpoflow.runtime.params import DpoParams  # noqa: E402
from dpoflow.training.dpo import make_batch, make_loss_fn  # noqa: E402


def best(f, repeats):
    f()
    out = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        f()
        out = min(out, time.process_time() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32+32", choices=sorted(common.SHAPES))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    P, C = common.SHAPES[args.shape]
    pairs = common.synthetic_pairs(P, C)
    encoded = [EncodedPair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    policy = build_policy(
        common.MODEL_DIR,
        args.finetune,
        lora_rank=common.LORA["rank"],
        lora_scale=common.LORA["scale"],
        lora_layers=common.LORA["layers"],
        seed=0,
    )
    model = policy.model
    ref = {"chosen": np.full(8, -390.0, np.float32), "rejected": np.full(8, -400.0, np.float32)}
    batch = make_batch(encoded, range(8), ref, pad_id_of(policy.tokenizer))
    loss_fn = make_loss_fn(DpoParams(beta=common.BETA))
    vg = nn.value_and_grad(model, loss_fn)
    opt = optim.AdamW(learning_rate=common.LEARNING_RATE)
    out = {"shape": args.shape, "finetune": args.finetune, "threads": common.threads()}
    for path in ("shared", "plain"):
        lp.SHARED_PROMPT_ENABLED = path == "shared"
        fwd = best(lambda: mx.eval(loss_fn(model, batch)[0]), args.repeats)
        fb = best(lambda: mx.eval(vg(model, batch)), args.repeats)
        (_, _), grads = vg(model, batch)
        mx.eval(grads)
        clip = best(lambda: mx.eval(optim.clip_grad_norm(grads, 1.0)), args.repeats)  # noqa: B023 (timed here)
        upd = best(
            lambda: (opt.update(model, grads), mx.eval(model.trainable_parameters(), opt.state)),  # noqa: B023
            args.repeats,
        )
        out[path] = {
            "forward": fwd,
            "forward_backward": fb,
            "backward": fb - fwd,
            "clip": clip,
            "adamw": upd,
            "step_sum": fb + clip + upd,
        }
        print(path, {k: round(v, 3) for k, v in out[path].items()}, flush=True)
    print(common.write_result(f"profile_dpoflow_{args.finetune}_{args.shape.replace('+', '_')}{common.suffix()}", out))


if __name__ == "__main__":
    main()
