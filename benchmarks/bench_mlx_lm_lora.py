"""mlx-lm-lora's DPO trainer (run with the venv from setup_envs.sh: .cache/benchmarks/venv-mlx-lm-lora).

    python benchmarks/bench_mlx_lm_lora.py --shape 32+32 --finetune lora [--steps 5]

Its Python API (the CLI's path): train_dpo(model, ref_model, AdamW, ...). Same model, pairs, beta, LoRA (r 8,
scale 20, every linear layer of the top 16 blocks) and learning rate as the other scripts. Its step: separate
forwards for chosen and rejected, full-vocabulary logits at every position, the reference model run every step
(it has no precomputed-reference mode), compiled step, no gradient clipping. "full" trains every weight.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32+32", choices=sorted(common.SHAPES))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    from importlib.metadata import version

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo

    P, C = common.SHAPES[args.shape]
    pairs = common.synthetic_pairs(P, C)
    gemm_before = common.gemm_gflops_mlx()
    model, _ = load(str(common.MODEL_DIR))
    ref_model, _ = load(str(common.MODEL_DIR))
    ref_model.freeze()
    if args.finetune == "lora":
        model.freeze()
        linear_to_lora_layers(
            model, common.LORA["layers"], {"rank": common.LORA["rank"], "scale": common.LORA["scale"], "dropout": 0.0}
        )
    else:
        model.unfreeze()
    data = [
        {
            "chosen": p["prompt_ids"] + p["chosen_ids"],
            "rejected": p["prompt_ids"] + p["rejected_ids"],
            "chosen_prompt_length": P,
            "rejected_prompt_length": P,
        }
        for p in pairs
    ]
    marks: list[float] = []
    cpu_marks: list[float] = []
    infos: list[dict] = []

    class Cb(TrainingCallback):
        def on_train_loss_report(self, info):
            marks.append(time.perf_counter())
            cpu_marks.append(time.process_time())
            infos.append(info)

    with tempfile.TemporaryDirectory() as tmp:
        targs = DPOTrainingArgs(
            batch_size=len(pairs),
            iters=args.steps + 1,
            steps_per_report=1,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=P + C,
            beta=common.BETA,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
        )
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        cpu_marks.append(time.process_time())
        train_dpo(
            model,
            ref_model,
            optim.AdamW(learning_rate=common.LEARNING_RATE),
            train_dataset=data,
            val_dataset=None,
            args=targs,
            training_callback=Cb(),
            loss_type="sigmoid",
        )
        wall = time.perf_counter() - t0
    gemm_after = common.gemm_gflops_mlx()
    step_times = [1.0 / i["iterations_per_second"] for i in infos]
    timed = step_times[1:]
    step_s = min(timed)
    gemm = max(gemm_before, gemm_after)
    flops = common.step_flops(P, C, len(pairs), args.finetune, reference_per_step=True)
    out = {
        "framework": "mlx-lm-lora",
        "versions": {"mlx-lm-lora": version("mlx-lm-lora"), "mlx": version("mlx"), "mlx-lm": version("mlx-lm")},
        "finetune": args.finetune,
        "shape": args.shape,
        "reference": "per-step",
        "n_pairs": len(pairs),
        "steps_timed": len(timed),
        "step_seconds": step_s,
        "step_seconds_median": sorted(timed)[len(timed) // 2],
        "step_seconds_all": step_times,
        "pairs_per_sec": len(pairs) / step_s,
        "tokens_per_sec": 2 * len(pairs) * (P + C) / step_s,
        "peak_memory_gb": max(i["peak_memory"] for i in infos),
        "peak_rss_gb": common.peak_rss_gb(),
        "gemm_gflops_before": gemm_before,
        "gemm_gflops_after": gemm_after,
        "nominal_gflop_per_step": flops / 1e9,
        "mfu": flops / step_s / (gemm * 1e9),
        "loss_first": infos[0]["train_loss"],
        "wall_seconds": wall,
        "load": common.cpu_load(),
        **common.cpu_stats([b - a for a, b in zip(cpu_marks, cpu_marks[1:])]),
    }
    name = (args.name or f"mlx_lm_lora_{args.finetune}_{args.shape.replace('+', '_')}") + common.suffix()
    print(common.write_result(name, out))
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items() if k != "load"})


if __name__ == "__main__":
    main()
