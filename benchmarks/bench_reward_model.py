"""Stage 4's reward-model step, shared prompt vs the [2B, T] forward, on the embedded default's own shapes.

    python benchmarks/bench_reward_model.py [--steps 4] [--shape 42+12] [--layers 30]

The reward model exactly as Stage 4 trains it (SFT body, LoRA on the top `--layers` blocks,
Bradley-Terry loss, AdamW, clipping 1.0) on synthetic pairs of the embedded default's shape (42 prompt + 12
completion tokens: metrics/preference_data.json), one run per path in this process: the same weights, batches and
machine state. Also checks that both paths give the same first loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import numpy as np  # noqa: E402

from dpoflow.core import logprobs as lp  # noqa: E402
from dpoflow.core.batching import EncodedPair  # noqa: E402
from dpoflow.modeling.loading import load_model  # noqa: E402
from dpoflow.modeling.reward_model import build_reward_model  # noqa: E402
from dpoflow.training.reward import make_batch, reward_loss  # noqa: E402
from dpoflow.training.trainer import TrainConfig, train  # noqa: E402


def run(path: str, encoded: list[EncodedPair], layers: int, steps: int) -> dict:
    lp.SHARED_PROMPT_ENABLED = path == "shared"
    backbone, tokenizer = load_model(common.MODEL_DIR, dtype="float32")
    rm = build_reward_model(backbone, tokenizer, lora_rank=8, lora_layers=layers, seed=0, max_seq_len=256)
    batch = make_batch(encoded, range(len(encoded)), rm.pad_id)
    cfg = TrainConfig(steps=steps + 1, learning_rate=5e-5, max_grad_norm=1.0, seed=0, desc=f"reward model {path}")
    cpu_marks = [time.process_time()]
    result = train(
        rm,
        lambda model, b: reward_loss(model, b, 0.01),
        lambda step, micro: batch,
        cfg,
        tokens_in=lambda b: b.pairs.n_tokens,
        on_step=lambda step, m: cpu_marks.append(time.process_time()),
    )
    timed = result.history[1:]
    step_s = float(min(h["step_seconds"] for h in timed))
    return {
        "path": path,
        "step_seconds": step_s,
        "step_seconds_all": [h["step_seconds"] for h in result.history],
        "pairs_per_sec": len(encoded) / step_s,
        "loss_first": result.history[0]["loss"],
        "peak_memory_gb": max(h["peak_memory_gb"] for h in result.history),
        **common.cpu_stats(np.diff(cpu_marks).tolist()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="42+12", help="prompt+completion tokens")
    ap.add_argument("--layers", type=int, default=30, help="LoRA blocks (reward_model.lora_layers)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path (after 1 warm-up step)")
    args = ap.parse_args()
    P, C = (int(x) for x in args.shape.split("+"))
    pairs = common.synthetic_pairs(P, C)
    encoded = [EncodedPair(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    runs = {path: run(path, encoded, args.layers, args.steps) for path in ("plain", "shared")}
    out = {
        "shape": args.shape,
        "lora_layers": args.layers,
        "n_pairs": len(pairs),
        "gemm_gflops": common.gemm_gflops_mlx(),
        "runs": runs,
        "speedup": runs["plain"]["step_seconds"] / runs["shared"]["step_seconds"],
        "first_loss_diff": abs(runs["plain"]["loss_first"] - runs["shared"]["loss_first"]),
        "load": common.cpu_load(),
    }
    print(common.write_result(f"reward_model_{args.shape.replace('+', '_')}" + common.suffix(), out))
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items() if k not in ("runs", "load")})
    for path, r in runs.items():
        print(path, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "step_seconds_all"})


if __name__ == "__main__":
    main()
