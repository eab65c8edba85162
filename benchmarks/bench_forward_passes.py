"""Forward-only passes vs the DPO training step, pairs per second at the pipeline's shapes (issue 23).

    BENCH_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/bench_forward_passes.py   # CPU s
    python benchmarks/bench_forward_passes.py --alternate /tmp/speed-before   # before/after, same run, alternating

Pairs: Stage 2's real prompts (data/tasks/pref_prompts.jsonl with params.yaml's system prompt: 40-45 tokens) and
synthetic completions of single-token words + eos (chosen and rejected 4-20 tokens, ~12 on average): the pipeline's
~42 + ~12. Model: the SFT model (models/sft), float32, with the pipeline's adapters (DPO: LoRA r 8, scale 20, top 16
blocks; reward model: LoRA on 30 blocks + the LM log-likelihood term, lm_logprob_weight 10).

Timed (process CPU seconds at 1 thread, wall and CPU at 2; best of --repeats):
  dpo_step          trainer.train + dpo.make_loss_fn (beta 0.3, sft_weight 2.0), 8 pairs a step (the cpu batch),
                    best of --steps; dpo_step_after: the same after the forward passes ran in the process
  ref_logps         modeling.reference.compute_ref_logps(reference, ..., batch_size=8)   (Stage 3, iterate)
  implicit_rewards  eval.measure.implicit_rewards(policy, ..., batch_size=16)            (held-out metrics)
  rm_score_pairs    RewardModel.score_encoded_pairs(..., batch_size=16)                  (Stage 4 scoring)
  rm_score          RewardModel.score(prompts, responses, batch_size=16)                 (reward-model judge)
The ratio of each forward pass's pairs/s to the DPO step's is the issue's figure (target >= 3). Every pass's outputs
are hashed and their max difference to the first checkout's is recorded (--alternate), so a before/after shows
that the numbers did not move beyond float32 rounding.
Writes results/forward_passes[_t1].json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

SYSTEM = "Reply with only the final answer, no explanation."


def make_pairs(tokenizer, n: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from dpoflow.data.tasks import item_prompt

    words = np.array(common.word_tokens(HERE.parent / "models/sft/tokenizer.json"))
    items = [json.loads(line) for line in (HERE.parent / "data/tasks/pref_prompts.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        c, r = (tokenizer.decode(rng.choice(words, int(rng.integers(3, 20))).tolist()).strip() for _ in range(2))
        pairs.append({"id": str(i), "prompt": item_prompt(items[i % len(items)], SYSTEM), "chosen": c, "rejected": r})
    return pairs


def run(src: Path, label: str, args) -> dict:
    sys.path.insert(0, str(src))
    import hashlib

    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import dpoflow
    from dpoflow.core.batching import ChosenRejected, encode_pair, pad_id
    from dpoflow.core.logprobs import reference_logprobs
    from dpoflow.eval.measure import implicit_rewards
    from dpoflow.modeling.loading import load_model
    from dpoflow.modeling.policy import build_policy
    from dpoflow.modeling.reference import compute_ref_logps
    from dpoflow.modeling.reward_model import build_reward_model
    from dpoflow.runtime.params import DpoParams
    from dpoflow.training.dpo import make_batch, make_loss_fn
    from dpoflow.training.trainer import TrainConfig, train

    assert Path(dpoflow.__file__).resolve().is_relative_to(src.resolve()), dpoflow.__file__
    threads = common.threads()
    model_dir = HERE.parent / "models/sft"
    policy = build_policy(model_dir, "lora", lora_rank=8, lora_scale=20.0, lora_layers=16, seed=0)
    tok = policy.tokenizer
    pad = pad_id(tok)
    pairs = make_pairs(tok, args.pairs)
    encoded = [encode_pair(tok, p, 128) for p in pairs]
    shape = {
        "prompt_tokens_mean": float(np.mean([len(e.prompt_ids) for e in encoded])),
        "completion_tokens_mean": float(np.mean([len(e.chosen_ids) + len(e.rejected_ids) for e in encoded]) / 2),
    }

    def timed(f, repeats: int):
        """(best CPU s, best wall s, output of the first call) over `repeats` calls after one warm-up."""
        out = f()
        cpu, wall = [], []
        for _ in range(repeats):
            c, w = time.process_time(), time.perf_counter()
            f()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        return min(cpu), min(wall), out

    results: dict[str, dict] = {}
    outputs: dict[str, list] = {}

    def record(name: str, n_pairs: int, cpu: float, wall: float, out) -> None:
        results[name] = {
            "pairs": n_pairs,
            "cpu_seconds": cpu,
            "wall_seconds": wall,
            "pairs_per_cpu_second": n_pairs / cpu,
            "pairs_per_wall_second": n_pairs / wall,
        }
        if out is not None:
            flat = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in out])
            outputs[name] = flat.tolist()
            results[name]["output_sha"] = hashlib.sha256(flat.astype(np.float32).tobytes()).hexdigest()[:16]
        print(label, name, json.dumps(results[name]), flush=True)

    # --- the DPO step (Stage 5): 8 pairs a step, length-sorted batches as the pipeline's schedule makes them. The
    # cached reference comes from the plain batched forward (core.logprobs), so that nothing before the step differs
    # between checkouts (the new forward-only pass tunes malloc for the rest of the process: dpo_step_after).
    order = np.argsort([-e.max_length for e in encoded], kind="stable")
    zero = ChosenRejected(np.zeros(len(encoded)), np.zeros(len(encoded)))
    ref_c, ref_r = np.zeros(len(encoded), np.float32), np.zeros(len(encoded), np.float32)
    for i in range(0, len(order), 8):
        idx = order[i : i + 8]
        sums, _ = reference_logprobs(policy.model, make_batch(encoded, idx, zero, pad).pairs)
        ref_c[idx], ref_r[idx] = np.asarray(sums[: len(idx)]), np.asarray(sums[len(idx) :])
    ref = ChosenRejected(ref_c, ref_r)
    batches = [make_batch(encoded, order[i : i + 8], ref, pad) for i in range(0, len(order) - 7, 8)]
    params = DpoParams(beta=0.3, sft_weight=2.0, learning_rate=2.5e-5, max_grad_norm=1.0)

    def dpo_steps(name: str, steps: int) -> None:
        marks, walls = [time.process_time()], [time.perf_counter()]
        train(
            policy.model,
            make_loss_fn(params),
            lambda step, micro: batches[step % len(batches)],
            TrainConfig(steps=steps + 1, learning_rate=2.5e-5, max_grad_norm=1.0, seed=0, desc=name),
            on_step=lambda step, m: (marks.append(time.process_time()), walls.append(time.perf_counter())),
        )
        record(name, 8, float(min(np.diff(marks)[1:])), float(min(np.diff(walls)[1:])), None)
        results[name]["cpu_seconds_all"] = np.diff(marks).tolist()
        results[name]["wall_seconds_all"] = np.diff(walls).tolist()

    snapshot = [(k, mx.array(v)) for k, v in tree_flatten(policy.model.trainable_parameters())]
    dpo_steps("dpo_step", args.steps)
    policy.model.load_weights(snapshot, strict=False)  # the forward passes measure the initial policy

    # --- forward-only passes
    with policy.as_reference() as reference:
        cpu, wall, out = timed(lambda: compute_ref_logps(reference, tok, pairs, 128, 8, desc="ref logps"), args.repeats)
    record("ref_logps", len(pairs), cpu, wall, out)
    cpu, wall, out = timed(lambda: implicit_rewards(policy.model, encoded, ref, 0.3, False, pad, 16), args.repeats)
    record("implicit_rewards", len(pairs), cpu, wall, out)
    dpo_steps("dpo_step_after", args.steps)  # the same step after the forward passes ran in this process
    policy = None  # free the policy before the reward model loads

    backbone, _ = load_model(model_dir)
    rm = build_reward_model(backbone, tok, lora_rank=8, lora_layers=30, seed=0, max_seq_len=128, lm_logprob_weight=10.0)
    rm.freeze()
    cpu, wall, out = timed(lambda: rm.score_encoded_pairs(encoded, 16), args.repeats)
    record("rm_score_pairs", len(pairs), cpu, wall, out)
    prompts = [p["prompt"] for p in pairs for _ in range(2)]
    responses = [p[k] for p in pairs for k in ("chosen", "rejected")]
    cpu, wall, out = timed(lambda: [rm.score(prompts, responses, 16)], args.repeats)
    record("rm_score", len(pairs), cpu, wall, out)  # 2 sequences (chosen, rejected) = 1 pair

    step = results["dpo_step"]
    for name, r in results.items():
        if not name.startswith("dpo_step"):
            r["ratio_to_dpo_step_cpu"] = r["pairs_per_cpu_second"] / step["pairs_per_cpu_second"]
            r["ratio_to_dpo_step_wall"] = r["pairs_per_wall_second"] / step["pairs_per_wall_second"]
    out = {
        "label": label,
        "src": str(src),
        "commit": common.checkout_commit(src),
        "threads": threads,
        "n_pairs": len(pairs),
        "shape": shape,
        "results": results,
        "outputs": outputs,
        "load": common.cpu_load(),
        "mlx": mx.__version__,
    }
    summary = {k: round(v.get("ratio_to_dpo_step_cpu", 1.0), 2) for k, v in results.items()}
    print(label, "ratios (CPU s):", summary, flush=True)
    path = common.RESULTS / f"forward_passes{common.suffix()}.json"
    runs = common.previous_runs(path)
    if runs:  # the first run's outputs are the yardstick
        for name, values in outputs.items():
            base = np.asarray(runs[0]["outputs"].get(name, []))
            if base.shape == np.asarray(values).shape:
                diff = np.abs(base - np.asarray(values))
                results[name]["max_abs_diff_to_first_run"] = float(diff.max())
                results[name]["max_rel_diff_to_first_run"] = float((diff / np.maximum(np.abs(base), 1e-6)).max())
    print(common.write_result(path.stem, {"runs": runs + [out]}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=HERE.parent, help="dpoflow checkout to run")
    ap.add_argument("--label", default="current")
    ap.add_argument("--alternate", type=Path, help="a 'before' checkout: run it and this one, alternating")
    ap.add_argument("--rounds", type=int, default=2, help="with --alternate: before/after pairs of runs")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed DPO steps (after 1 warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls of each forward pass (after 1 warm-up)")
    args = ap.parse_args()
    if args.alternate:
        me = [sys.executable, __file__, "--pairs", str(args.pairs), "--steps", str(args.steps)]
        me += ["--repeats", str(args.repeats)]
        (common.RESULTS / f"forward_passes{common.suffix()}.json").unlink(missing_ok=True)
        for _ in range(args.rounds):
            subprocess.run(me + ["--src", str(args.alternate), "--label", "before"], check=True)
            subprocess.run(me + ["--src", str(args.src), "--label", "current"], check=True)
        return
    run(args.src, args.label, args)


if __name__ == "__main__":
    main()
