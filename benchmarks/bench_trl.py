"""TRL's DPOTrainer on PyTorch CPU (run with the venv from setup_envs.sh: .cache/benchmarks/venv-trl).

    python benchmarks/bench_trl.py --shape 32+32 --finetune lora --reference precomputed [--steps 5]

Same model (the mlx-lm folder models/base: HF llama layout, tied embeddings), same synthetic pairs, beta, AdamW,
LoRA (r 8, alpha 160 = scale 20, all 7 projections of the top 16 blocks) as bench_dpoflow.py. fp32 (bf16=False),
no gradient checkpointing (TRL's default is on; off is faster and memory is no issue here), 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def torch_gemm_gflops() -> float:
    import torch

    return common.gemm_gflops_numpy_like(lambda a, b: a @ b, lambda s: torch.randn(*s))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32+32", choices=sorted(common.SHAPES))
    ap.add_argument("--finetune", default="lora", choices=["lora", "full"])
    ap.add_argument("--reference", default="precomputed", choices=["precomputed", "per-step"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(common.threads())
    P, C = common.SHAPES[args.shape]
    pairs = common.synthetic_pairs(P, C)
    gemm_torch_before = torch_gemm_gflops()
    tok = AutoTokenizer.from_pretrained(common.MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(common.MODEL_DIR, dtype=torch.float32)
    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        n_layers = model.config.num_hidden_layers
        peft_config = LoraConfig(
            r=common.LORA["rank"],
            lora_alpha=common.LORA["rank"] * common.LORA["scale"],
            lora_dropout=0.0,
            target_modules=common.LORA_TARGETS,
            task_type="CAUSAL_LM",
            layers_to_transform=list(range(n_layers - common.LORA["layers"], n_layers)),
        )
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    times: list[float] = []
    cpu: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=len(pairs),
            learning_rate=common.LEARNING_RATE,
            beta=common.BETA,
            max_steps=args.steps + 1,
            max_grad_norm=common.MAX_GRAD_NORM,
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_length=None,
            precompute_ref_log_probs=args.reference == "precomputed",
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[Timer()],
        )
        first = trainer.train_dataset[0]
        assert len(first["prompt_ids"]) == P and len(first["chosen_ids"]) == C, (
            len(first["prompt_ids"]),
            len(first["chosen_ids"]),
        )
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h]
    gemm_torch_after = torch_gemm_gflops()
    timed = times[1:]
    step_s = min(timed)
    tokens = 2 * len(pairs) * (P + C)
    gemm_ref = (
        json.loads((common.RESULTS / "gemm.json").read_text())["mlx_openblas_gflops"]
        if (common.RESULTS / "gemm.json").exists()
        else None
    )
    flops = common.step_flops(P, C, len(pairs), args.finetune, reference_per_step=args.reference == "per-step")
    gemm_torch = max(gemm_torch_before, gemm_torch_after)
    out = {
        "framework": "trl",
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "finetune": args.finetune,
        "shape": args.shape,
        "reference": args.reference,
        "n_pairs": len(pairs),
        "optimizer": cfg.optim,
        "steps_timed": len(timed),
        "step_seconds": step_s,
        "step_seconds_median": sorted(timed)[len(timed) // 2],
        "step_seconds_all": times,
        "pairs_per_sec": len(pairs) / step_s,
        "tokens_per_sec": tokens / step_s,
        "peak_rss_gb": common.peak_rss_gb(),
        "gemm_gflops_torch": gemm_torch,
        "gemm_gflops_torch_before": gemm_torch_before,
        "gemm_gflops_torch_after": gemm_torch_after,
        "nominal_gflop_per_step": flops / 1e9,
        "mfu_vs_torch_gemm": flops / step_s / (gemm_torch * 1e9),
        "mfu_vs_openblas_gemm": flops / step_s / (gemm_ref * 1e9) if gemm_ref else None,
        "loss_first": logs[0]["loss"] if logs else None,
        "wall_seconds": wall,
        "load": common.cpu_load(),
        **common.cpu_stats(cpu),
    }
    out["optimizer"] = str(getattr(out["optimizer"], "value", out["optimizer"]))
    name = (args.name or f"trl_{args.finetune}_{args.reference}_{args.shape.replace('+', '_')}") + common.suffix()
    print(common.write_result(name, out))
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items() if k != "load"})


if __name__ == "__main__":
    main()
