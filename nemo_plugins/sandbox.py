"""Run untrusted Python with limits: the ``python`` tool during generation, later the unit tests of GRPO's code
reward. A model's program must not reach the network, hang the run, exhaust memory, processes or disk, read the
parent's secrets or change the repository; whatever it does, the next run works.

Linux (>= 5.3) only. Each run is a fresh process of this interpreter in isolated mode (``-I``), in its own
session and a temporary working directory deleted afterwards, with a minimal environment (nothing of
``os.environ`` is passed). Before the program runs, the child applies, in this order, whatever the host allows
(``SandboxResult.isolation`` names what was in force):

- ``netns``: a new, empty network namespace (``unshare(CLONE_NEWNET)``, inside a new user namespace when not
  root): its only interface is a loopback that is down, so nothing, not even the parent's 127.0.0.1, is reachable.
- ``uid``: as the host's root, a per-run unprivileged uid keeping only CAP_DAC_READ_SEARCH (an interpreter under
  a private home stays readable): root's files are read-only to it and other users' processes out of its reach.
- ``userns``: otherwise a user namespace of its own (all capabilities dropped), where the host allows one.
- ``landlock-fs`` / ``landlock-tcp`` / ``landlock-scope``: a Landlock domain (by the kernel's ABI) where writes
  are allowed only in the working directory and to /dev/null (so no GPU either), TCP bind/connect are refused,
  and signals or abstract unix sockets cannot leave the sandbox.
- ``nproc``: RLIMIT_NPROC (processes + threads), where it counts this run alone (``uid`` or ``userns``).
- ``audit-hook``: an in-process audit hook refusing sockets and new programs (``exec``, ``subprocess``).
- always: RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (files), no core dumps, no new privileges; the parent keeps
  at most ``output_bytes`` of each stream while reading and kills the process group when the program ends, at
  the wall-clock limit or past the output limit.

Programs may fork and start threads (within ``nproc``) but not run other programs; multiprocessing's pools and
locks fail under Landlock (their semaphores live in /dev/shm).

A set-up step that fails where the host offers it stops the run (status ``sandbox_error``); one the host does not
offer (an old kernel, a container's seccomp profile) is left out of ``isolation``.

Not protected (it is not a VM): reads of any file the parent can read; kernel exploits; a program that calls
``setsid()`` escapes the final process-group kill (it keeps its CPU limit and, where ``netns`` is in force, stays
offline); ctypes can bypass the audit hook (not the namespace, Landlock or the rlimits); without ``nproc`` a fork
bomb is bounded only by the wall-clock kill; a program that itself exits with code 90 is reported as ``memory``.

This file is also the child's entry script (``python -I sandbox.py``), so it imports only the standard library at
module level: the child starts without loading torch.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import runpy
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "file_limit", "sandbox_error")
_MEMORY_EXIT = 90
_MAIN = "main.py"
_RUN_UID_BASE = 2_000_000_000  # + the child's pid: unique among live processes, far from real accounts
_CAP_DAC_READ_SEARCH = 2
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_PR_SET_KEEPCAPS, _PR_SET_NO_NEW_PRIVS = 8, 38
_BLOCKED_EVENTS = ("socket.", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
                   "subprocess.Popen")


@dataclass
class SandboxLimits:
    """Per-run limits; each is enforced by the kernel (rlimits) or by the parent (wall clock, output)."""

    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30
    output_bytes: int = 64 << 10
    file_bytes: int = 16 << 20
    max_processes: int = 16

    def __post_init__(self) -> None:
        # imported here: this file is also the child's entry script, which must start on the standard library alone
        from nemo_plugins.errors import ConfigError

        for name in ("cpu_seconds", "memory_bytes", "output_bytes", "file_bytes", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sandbox.{name} must be a positive integer, got {value!r}")
        if isinstance(self.wall_seconds, bool) or not isinstance(self.wall_seconds, (int, float)) \
                or not self.wall_seconds > 0:
            raise ConfigError(f"sandbox.wall_seconds must be a positive number, got {self.wall_seconds!r}")
        if self.memory_bytes < 64 << 20:
            raise ConfigError(f"sandbox.memory_bytes={self.memory_bytes} is too small for the interpreter to "
                              "start; give at least 64 MiB (67108864)")


@dataclass(frozen=True)
class SandboxResult:
    """What a run produced; ``status`` is one of STATUSES and ``reason`` says why in one line ("" when ok)."""

    stdout: str
    stderr: str
    exit_code: int
    status: str
    reason: str
    isolation: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, limits: SandboxLimits, stdin: str = "", files: dict[str, str] | None = None
               ) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh sandboxed interpreter, with ``files`` (relative path -> text) beside
    it and ``stdin`` as its standard input."""
    workdir = tempfile.mkdtemp(prefix="cascade-sandbox-")
    try:
        _write_files(workdir, {**(files or {}), _MAIN: code})
        return _run(workdir, limits, stdin)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _write_files(workdir: str, files: dict[str, str]) -> None:
    from nemo_plugins.errors import DataError

    for name, text in files.items():
        path = os.path.normpath(os.path.join(workdir, name))
        if os.path.isabs(name) or not path.startswith(workdir + os.sep):
            raise DataError(f"sandbox file {name!r} must be a relative path inside the working directory: fix the "
                            "record that names it")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def _run(workdir: str, limits: SandboxLimits, stdin: str) -> SandboxResult:
    report_r, report_w = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    config = {"limits": asdict(limits), "workdir": workdir, "report_fd": report_w}
    start = time.monotonic()
    with tempfile.TemporaryFile() as stdin_file:
        stdin_file.write(stdin.encode())
        stdin_file.seek(0)
        try:
            proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)],
                                    stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                                    env=env, start_new_session=True, pass_fds=(report_w,))
        finally:
            os.close(report_w)
    with os.fdopen(report_r, "rb") as report_file:
        stdout, stderr, stopped = _collect(proc, limits, start + limits.wall_seconds)
        report = json.loads(report_file.read() or b'{"error": "the child died before reporting"}')
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    status, reason = _classify(proc.returncode, stopped, report, err, limits)
    return SandboxResult(out, err, proc.returncode, status, reason, tuple(report.get("isolation", ())),
                         time.monotonic() - start)


def _collect(proc: subprocess.Popen, limits: SandboxLimits, deadline: float) -> tuple[bytes, bytes, str]:
    """Read both streams, keeping at most ``output_bytes`` of each, until they close. The process group is killed
    when the program ends (leftover children would hold the pipes open), at the deadline (stopped "wall") or at
    the first byte past the output limit (stopped "output")."""
    kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    stopped = ""
    pidfd = os.pidfd_open(proc.pid)
    with selectors.DefaultSelector() as selector:
        for fd in (*kept, pidfd):
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and not stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = "wall"
                break
            for key, _ in selector.select(remaining):
                if key.fd == pidfd:
                    selector.unregister(pidfd)
                    _kill_group(proc.pid)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                room = limits.output_bytes - len(kept[key.fd])
                kept[key.fd] += chunk[:room]
                if len(chunk) > room:
                    stopped = "output"
    os.close(pidfd)
    _kill_group(proc.pid)
    proc.wait()
    stdout, stderr = (bytes(kept[stream.fileno()]) for stream in (proc.stdout, proc.stderr))
    proc.stdout.close()
    proc.stderr.close()
    return stdout, stderr, stopped


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(exit_code: int, stopped: str, report: dict, stderr: str, limits: SandboxLimits) -> tuple[str, str]:
    if "error" in report:
        return "sandbox_error", f"sandbox set-up failed: {report['error']}"
    if stopped == "output":
        return "output_limit", f"output exceeded {limits.output_bytes} bytes; the program was stopped"
    if stopped == "wall":
        return "timeout", f"wall-clock limit of {limits.wall_seconds:g} s exceeded"
    if exit_code == -signal.SIGXCPU:
        return "timeout", f"CPU time limit of {limits.cpu_seconds} s exceeded"
    if exit_code == -signal.SIGXFSZ:
        return "file_limit", f"a file exceeded the limit of {limits.file_bytes} bytes"
    if exit_code == _MEMORY_EXIT:
        return "memory", f"memory limit of {limits.memory_bytes} bytes exceeded (MemoryError)"
    if exit_code < 0:
        return "error", f"killed by {signal.Signals(-exit_code).name}"
    if exit_code > 0:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        return "error", lines[-1][:200] if lines else f"exit code {exit_code}"
    return "ok", ""


# ---- the child: isolate, then run main.py ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def _namespaces() -> tuple[str, ...]:
    """A new network namespace, inside a new user namespace where only that is allowed (not root)."""
    for flags, names in ((_CLONE_NEWNET, ("netns",)), (_CLONE_NEWUSER | _CLONE_NEWNET, ("userns", "netns"))):
        if _libc.unshare(flags) == 0:
            return names
    return ()


def _root_kind() -> str:
    """"host" for the host's uid 0; "mapped" for a uid 0 that is root outside its user namespace too (a rootless
    container run by root): it cannot switch to unmapped uids and RLIMIT_NPROC never applies to it; else ""."""
    with open("/proc/self/uid_map") as f:
        ranges = [tuple(map(int, line.split())) for line in f]
    euid = os.geteuid()
    if ranges == [(0, 0, 4294967295)]:
        return "host" if euid == 0 else ""
    outside = [out + euid - inside for inside, out, count in ranges if inside <= euid < inside + count]
    return "mapped" if outside == [0] else ""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_capabilities(keep: int) -> None:
    """Effective = permitted = ``keep`` (a bit mask of the first 32 capabilities), nothing inheritable."""
    data = (_CapData * 2)(_CapData(keep, keep, 0), _CapData(0, 0, 0))
    _check(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data), "capset")


def _become_run_uid(workdir: str) -> None:
    """Hand the working directory to a per-run uid and become it, keeping only CAP_DAC_READ_SEARCH."""
    uid = _RUN_UID_BASE + os.getpid()
    for root, dirs, names in os.walk(workdir):
        for name in (root, *(os.path.join(root, n) for n in dirs + names)):
            os.chown(name, uid, uid)
    _check(_libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _set_capabilities(1 << _CAP_DAC_READ_SEARCH)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(workdir: str) -> tuple[str, ...]:
    """A Landlock domain (Linux >= 5.13, by ABI version): writes only under ``workdir`` and to /dev/null,
    no TCP bind/connect (ABI 4), no signals or abstract unix sockets out of the sandbox (ABI 6)."""
    create, add_rule, restrict = 444, 445, 446  # the same syscall numbers on every architecture
    abi = _libc.syscall(create, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return ()
    write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
    tree_writes = sum(1 << bit for bit in range(4, 13)) | (1 << 13 if abi >= 2 else 0)  # remove, make, refer
    handled = write_file | truncate | tree_writes
    attr = _RulesetAttr(handled, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    ruleset = _check(_libc.syscall(create, ctypes.byref(attr), ctypes.sizeof(attr), 0), "landlock_create_ruleset")
    try:
        for path, allowed in ((workdir, handled), ("/dev/null", write_file | truncate)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(allowed, fd)
                _check(_libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), 0), f"landlock_add_rule({path})")
            finally:
                os.close(fd)
        _check(_libc.syscall(restrict, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return ("landlock-fs",) + (("landlock-tcp",) if abi >= 4 else ()) + (("landlock-scope",) if abi >= 6 else ())


def _refuse_network_and_programs(event: str, args: tuple) -> None:
    if event.startswith(_BLOCKED_EVENTS):
        raise PermissionError(errno.EPERM, f"sandbox: {event} is not allowed (no network, no new programs)")


def _isolate(limits: dict, workdir: str) -> list[str]:
    """Everything the program runs under, strongest first; returns the names of what is in force."""
    root = _root_kind()  # read before a new user namespace hides the mapping
    isolation = [*_namespaces()]
    # RLIMIT_NPROC counts the processes of a (user namespace, uid) and spares root: a run counts alone under a
    # uid of its own (host root) or in a user namespace of its own (everyone else, where allowed)
    if root == "host":
        _become_run_uid(workdir)
        isolation.append("uid")
    else:
        if "userns" not in isolation and _libc.unshare(_CLONE_NEWUSER) == 0:
            isolation.append("userns")
        _set_capabilities(0)  # whatever a user namespace granted
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    isolation += _landlock(workdir)
    for kind, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, limits["cpu_seconds"]),
                        (resource.RLIMIT_FSIZE, limits["file_bytes"])):
        resource.setrlimit(kind, (value, value + 1 if kind == resource.RLIMIT_CPU else value))
    if "uid" in isolation or ("userns" in isolation and root != "mapped"):
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
        isolation.append("nproc")
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the default ends the run, status file_limit
    sys.addaudithook(_refuse_network_and_programs)
    return isolation + ["audit-hook"]


def _print_traceback(exc: BaseException) -> None:
    """The traceback from the program's own frames on (the bootstrap's and runpy's are noise to the reader)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != _MAIN:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _child_main(config: dict) -> None:
    report_fd = config["report_fd"]
    try:
        isolation = _isolate(config["limits"], config["workdir"])
    except Exception as exc:  # refuse to run the program half-isolated
        os.write(report_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(1)
    os.write(report_fd, json.dumps({"isolation": isolation}).encode())
    os.close(report_fd)
    sys.argv = [_MAIN]
    sys.path.insert(0, config["workdir"])  # as for `python main.py`: the files beside it are importable
    try:
        runpy.run_path(_MAIN, run_name="__main__")  # relative: tracebacks name main.py, not the temp dir
    except SystemExit:
        raise
    except MemoryError as exc:
        _print_traceback(exc)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_MEMORY_EXIT)
    except BaseException as exc:
        _print_traceback(exc)
        sys.exit(1)


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
