"""Shared by every benchmark script (dpoflow's venv and the peers' venvs alike: stdlib + numpy + tokenizers only).

Synthetic pairs: each prompt / completion is a run of single-token words (" word" tokens that encode back to
themselves), so every framework's own tokenization gives exactly the intended ids:
    prompt     = P word tokens (no chat template, no BOS: SmolLM2's tokenizer adds none)
    chosen     = C - 1 word tokens + eos   (TRL and dpoflow append eos to completions; mlx-lm-lora: see its script)
    rejected   = C - 1 other word tokens + eos
Nominal model FLOPs of one DPO step (the same number for every framework, so MFU is comparable):
    forward    = 2 * N_body * (2B (P + C)) + 2 * N_head * (2B C)    (LM head at completion positions only)
    backward   = 2 x forward (full: activations' and weights' gradients); LoRA on the top l of L blocks: the
                 activations' gradients through the head and those blocks only, 2 N_head 2BC + (l / L) 2 N_body 2B(P+C)
    step       = forward + backward (+ 1 x forward when the reference runs every step)
Work an implementation avoids (dpoflow's shared prompt runs B P + 2B C body tokens, not 2B(P+C)) is still counted:
MFU compares everyone's speed on the same nominal work.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODEL_DIR = ROOT.parent / "models" / "base"  # SmolLM2-135M-Instruct, fp32 mlx-lm folder (HF llama layout)
BETA, LEARNING_RATE, MAX_GRAD_NORM = 0.1, 5e-5, 1.0
LORA = {"rank": 8, "scale": 20.0, "layers": 16}  # all 7 linear layers of the top 16 blocks (mlx-lm's default keys)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"32+32": (32, 32), "192+32": (192, 32)}
N_PAIRS = 8


def word_tokens(tokenizer_json: Path = MODEL_DIR / "tokenizer.json") -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out = []
    for _piece, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        text = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,9}", text) and tok.encode(text, add_special_tokens=False).ids == [i]:
            out.append(i)
    return out


def synthetic_pairs(prompt_len: int, completion_len: int, n_pairs: int = N_PAIRS, seed: int = 0) -> list[dict]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    eos = json.loads((MODEL_DIR / "config.json").read_text())["eos_token_id"]
    words = np.array(word_tokens())
    rng = np.random.default_rng([seed, prompt_len, completion_len])
    pairs = []
    for _ in range(n_pairs):
        p, c, r = (rng.choice(words, n).tolist() for n in (prompt_len, completion_len - 1, completion_len - 1))
        pairs.append(
            {
                "prompt": tok.decode(p),
                "chosen": tok.decode(c),
                "rejected": tok.decode(r),
                "prompt_ids": p,
                "chosen_ids": c + [eos],
                "rejected_ids": r + [eos],
            }
        )
    # the texts must tokenize back to the ids
    for pair in pairs:
        assert tok.encode(pair["prompt"], add_special_tokens=False).ids == pair["prompt_ids"]
        assert tok.encode(pair["chosen"], add_special_tokens=False).ids + [eos] == pair["chosen_ids"]
    return pairs


def model_params(config_path: Path = MODEL_DIR / "config.json") -> tuple[int, int]:
    """(N_body, N_head): parameters used per token by the transformer body and by the (tied) LM head."""
    c = json.loads(Path(config_path).read_text())
    d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim", d // c["num_attention_heads"])
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    return L * (attn + 3 * d * f + 2 * d) + d, d * v


def step_flops(prompt_len: int, completion_len: int, n_pairs: int, finetune: str, reference_per_step: bool) -> float:
    n_body, n_head = model_params()
    rows = 2 * n_pairs
    body = 2 * n_body * rows * (prompt_len + completion_len)
    head = 2 * n_head * rows * completion_len
    forward = body + head
    n_layers = json.loads((MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    backward = 2 * forward if finetune == "full" else head + body * LORA["layers"] / n_layers
    return forward + backward + (forward if reference_per_step else 0)


def work_flops(
    prompt_len: int, completion_len: int, n_pairs: int, finetune: str, reference_per_step: bool, shared_prompt: bool
) -> float:
    """step_flops with the body tokens an implementation really runs: a shared prompt runs B P + 2B (C - 1)."""
    if not shared_prompt:
        return step_flops(prompt_len, completion_len, n_pairs, finetune, reference_per_step)
    rows = 2 * n_pairs
    eq = (n_pairs * prompt_len + rows * (completion_len - 1)) / rows  # per-row body tokens, equivalent
    n_body, n_head = model_params()
    body_factor = eq / (prompt_len + completion_len)
    full = step_flops(prompt_len, completion_len, n_pairs, finetune, reference_per_step)
    body_part = full - _head_part(completion_len, n_pairs, finetune, reference_per_step)
    return body_part * body_factor + _head_part(completion_len, n_pairs, finetune, reference_per_step)


def _head_part(completion_len: int, n_pairs: int, finetune: str, reference_per_step: bool) -> float:
    head = 2 * model_params()[1] * 2 * n_pairs * completion_len
    return head * (3 if finetune == "full" else 2) + (head if reference_per_step else 0)


def gemm_shapes() -> list[tuple[int, int, int]]:
    """(M, K, N) of SmolLM2-135M's matmuls at 1024 tokens: attention/MLP projections and the LM head."""
    return [(1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576), (512, 576, 49152)]


def gemm_gflops_numpy_like(matmul, make, sync=lambda x: x, repeats: int = 5) -> float:
    """fp32 GEMM rate over the model's shapes with a framework's matmul; best of `repeats` per shape."""
    total_flops, total_s = 0.0, 0.0
    clock = time.process_time if threads() == 1 else time.perf_counter  # 1 thread: CPU time (see cpu_stats)
    for m, k, n in gemm_shapes():
        a, b = make((m, k)), make((k, n))
        sync(matmul(a, b))
        best = float("inf")
        for _ in range(repeats):
            t = clock()
            sync(matmul(a, b))
            best = min(best, clock() - t)
        total_flops += 2 * m * k * n
        total_s += best
    return total_flops / total_s / 1e9


def gemm_gflops_mlx() -> float:
    import mlx.core as mx

    return gemm_gflops_numpy_like(lambda a, b: a @ b, lambda s: mx.random.normal(s), lambda x: mx.eval(x))


def cpu_load() -> dict:
    """What else runs: 1-minute load average and the busiest other processes (this machine is shared)."""
    out = {"loadavg_1m": os.getloadavg()[0]}
    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,ni,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
        out["top_processes"] = [" ".join(line.split()) for line in ps.splitlines()[1:5]]
    except OSError:
        pass
    return out


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1)
        flags = re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split()
        info["avx512f"] = "avx512f" in flags
        mem = Path("/proc/meminfo").read_text()
        info["mem_gib"] = round(int(re.search(r"MemTotal:\s*(\d+)", mem).group(1)) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    return info


def threads() -> int:
    """Threads per framework (BENCH_THREADS, default 2). run.py sets OPENBLAS_NUM_THREADS/OMP_NUM_THREADS to match
    before the libraries load."""
    return int(os.environ.get("BENCH_THREADS", "2"))


def suffix() -> str:
    return "" if threads() == 2 else f"_t{threads()}"


def cpu_stats(cpu_times: list[float]) -> dict:
    """Per-step process CPU seconds (all threads). On a machine shared with higher-priority work, wall time
    measures the others as much as us; CPU time does not (at 1 thread, where no BLAS thread spin-waits)."""
    timed = cpu_times[1:]
    return {
        "cpu_seconds_all": cpu_times,
        "cpu_seconds": min(timed) if timed else None,
        "cpu_seconds_median": sorted(timed)[len(timed) // 2] if timed else None,
        "threads": threads(),
    }


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**data, "machine": machine_info(), "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    path.write_text(json.dumps(data, indent=1))
    return path


def checkout_commit(src: Path) -> str:
    """Short commit of a dpoflow checkout, '+changes' when its dpoflow/ has uncommitted edits."""
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--", "dpoflow"], capture_output=True, text=True
    ).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def previous_runs(path: Path) -> list[dict]:
    """The runs a results file already holds (a benchmark appends its run to them)."""
    return json.loads(path.read_text())["runs"] if path.exists() else []
