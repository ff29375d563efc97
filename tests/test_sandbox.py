"""Attacks on the sandbox. Each test fails if the protection it names is removed, and after every test a normal
program still runs (the run continues after a failing case)."""

import ctypes
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_bytes=256 << 20, output_bytes=64 << 10,
                       file_bytes=1 << 20, max_processes=8)
REPO = Path(__file__).resolve().parents[1]


def _host_allows_network_namespace() -> bool:
    """Asked of util-linux, not of the sandbox: a broken sandbox must fail these tests, not skip them."""
    if shutil.which("unshare") is None:
        return False
    command = ["unshare", "--net", "true"] if os.geteuid() == 0 else ["unshare", "--user", "--net", "true"]
    return subprocess.run(command, capture_output=True).returncode == 0


def _host_root() -> bool:
    """The host's uid 0 (not a container's mapped root) can always give a run its own uid."""
    return os.geteuid() == 0 and Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]


def _host_has_landlock() -> bool:
    return ctypes.CDLL(None, use_errno=True).syscall(444, None, 0, 1) >= 1


@pytest.fixture(autouse=True)
def _next_run_works():
    yield
    result = run_python("print(6 * 7)", LIMITS)
    assert (result.status, result.stdout) == ("ok", "42\n"), result


def test_normal_program_gets_stdin_files_and_stdout():
    code = "import os, helper\nprint(input().upper(), helper.VALUE)\nprint(os.getcwd())"
    result = run_python(code, LIMITS, stdin="hello\n", files={"helper.py": "VALUE = 7\n"})
    assert result.status == "ok" and result.exit_code == 0 and result.reason == "" and result.ok
    first, workdir = result.stdout.splitlines()
    assert first == "HELLO 7"
    assert not os.path.exists(workdir)  # the temp working dir is deleted afterwards


def test_failing_program_reports_one_line_and_its_own_traceback():
    result = run_python("def f():\n    return 1 / 0\nf()", LIMITS)
    assert (result.status, result.exit_code, result.reason) == ("error", 1, "ZeroDivisionError: division by zero")
    assert result.stderr.startswith("Traceback") and 'File "main.py", line 2, in f' in result.stderr
    assert "runpy" not in result.stderr and "sandbox.py" not in result.stderr
    result = run_python("import sys; sys.exit(3)", LIMITS)
    assert (result.status, result.exit_code, result.reason) == ("error", 3, "exit code 3")


def test_cannot_connect_to_a_listening_loopback_port():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', %d), timeout=2)\n    print('connected')\n"
            "except OSError as exc:\n    print('refused', exc)" % port)
    try:
        control = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
        assert control.stdout.startswith("connected")  # the same program outside the sandbox does connect
        listener.accept()[0].close()
        result = run_python(code, LIMITS)
        assert result.stdout.startswith("refused"), result
        assert select.select([listener], [], [], 0.5)[0] == []  # nothing reached the listener
    finally:
        listener.close()


@pytest.mark.skipif(not _host_allows_network_namespace(), reason="this host refuses new network namespaces")
def test_program_runs_in_a_fresh_network_namespace():
    result = run_python("import os; print(os.readlink('/proc/self/ns/net'))", LIMITS)
    assert "netns" in result.isolation
    assert result.stdout.strip() != os.readlink("/proc/self/ns/net")


@pytest.mark.parametrize("code, event", [
    ("import socket; socket.socket()", "socket.__new__"),
    ("import subprocess; subprocess.run(['true'])", "subprocess.Popen"),
    ("import os; os.system('true')", "os.system"),
])
def test_audit_hook_refuses_sockets_and_programs(code, event):
    result = run_python(code, LIMITS)
    assert result.status == "error" and "audit-hook" in result.isolation
    assert result.reason.startswith("PermissionError") and event in result.reason


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    result = run_python("while True:\n    pass", SandboxLimits(cpu_seconds=1, wall_seconds=60))
    assert result.status == "timeout" and "CPU time limit" in result.reason


def test_sleeping_program_is_stopped_by_the_wall_clock_limit():
    result = run_python("import time\ntime.sleep(60)", SandboxLimits(cpu_seconds=2, wall_seconds=1))
    assert result.status == "timeout" and "wall-clock limit" in result.reason


@pytest.mark.parametrize("size", [1 << 30, 10 << 30])
def test_large_allocation_is_stopped(size):
    # bytes(n) is calloc'd and never touched: without the limit it would succeed, not hurt the machine
    result = run_python(f"data = bytes({size})\nprint('allocated')", LIMITS)
    assert result.status == "memory" and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr


def test_fork_bomb_is_bounded_and_its_children_are_killed():
    code = ("import os, time\nchildren = []\ntry:\n    for _ in range(200):\n        pid = os.fork()\n"
            "        if pid == 0:\n            time.sleep(60)\n            os._exit(0)\n        children.append(pid)\n"
            "except OSError:\n    pass\nprint(' '.join(map(str, children)))")
    result = run_python(code, LIMITS)
    if "nproc" not in result.isolation and not _host_root():
        pytest.skip("no per-run process limit on this host (not the host's root, no user namespaces)")
    children = [int(pid) for pid in result.stdout.split()]
    assert result.status == "ok" and 0 < len(children) < LIMITS.max_processes
    for _ in range(100):  # they are SIGKILLed with the group; init reaps them
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
        if not alive:
            break
        time.sleep(0.05)
    assert alive == []


def test_output_is_truncated_at_the_limit():
    code = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)"
    result = run_python(code, LIMITS)
    assert result.status == "output_limit"
    assert result.stdout == "x" * LIMITS.output_bytes


def test_large_file_is_stopped():
    result = run_python("open('big', 'wb').write(b'x' * (10 << 20))", LIMITS)
    assert result.status == "file_limit"


def test_parent_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("CASCADE_SANDBOX_SECRET", "hunter2")
    code = ("import os\nprint(sorted(os.environ.items()))\ntry:\n"
            f"    print(open('/proc/{os.getpid()}/environ', 'rb').read())\nexcept OSError as exc:\n    print(exc)")
    result = run_python(code, LIMITS)
    assert result.status == "ok" and "hunter2" not in result.stdout


def test_writing_into_the_repository_is_not_persisted():
    target = REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    try:
        result = run_python(f"open({str(target)!r}, 'w').write('escaped')", LIMITS)
        assert not target.exists()
        assert result.status == "error" and "PermissionError" in result.reason
    finally:
        target.unlink(missing_ok=True)


@pytest.mark.skipif(not _host_has_landlock(), reason="this kernel has no Landlock")
def test_writes_outside_the_working_dir_are_refused_even_where_everyone_may_write(tmp_path):
    open_dir = tmp_path / "world-writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    tmp_path.chmod(0o755)
    result = run_python(f"open({str(open_dir / 'escape.txt')!r}, 'w').write('escaped')", LIMITS)
    assert "landlock-fs" in result.isolation
    assert not (open_dir / "escape.txt").exists() and "PermissionError" in result.reason


@pytest.mark.parametrize("change, key", [
    ({"cpu_seconds": 0}, "sandbox.cpu_seconds"),
    ({"wall_seconds": -1.0}, "sandbox.wall_seconds"),
    ({"memory_bytes": 1 << 20}, "sandbox.memory_bytes"),
    ({"max_processes": True}, "sandbox.max_processes"),
])
def test_limits_are_validated(change, key):
    with pytest.raises(ConfigError, match=key):
        SandboxLimits(**change)


def test_files_must_stay_in_the_working_dir():
    with pytest.raises(DataError, match="relative path"):
        run_python("pass", LIMITS, files={"../outside.py": ""})
