"""The code reward: a response's program against its tests in one sandbox run, each attack scored and contained."""

import os
import socket
import time
import uuid

import pytest

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.rl.rewards import CodeRewardSettings, RewardItem
from nemo_plugins.rl.rewards.code import CodeReward, extract_code, run_tests
from nemo_plugins.sandbox import SandboxLimits

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=8, memory_bytes=256 << 20, output_bytes=16 << 10,
                       file_bytes=1 << 20, max_processes=8)
SHORT = SandboxLimits(cpu_seconds=1, wall_seconds=3, memory_bytes=256 << 20, max_processes=8)  # for runs that hang
SETTINGS = CodeRewardSettings(limits=LIMITS, test_seconds=1.0, workers=2)
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4", "assert add(0, 0) == 0"]
PROMPT = [{"role": "user", "content": "Write add(a, b)."}]


def _item(response: str, tests=TESTS, **meta) -> RewardItem:
    return RewardItem(PROMPT, {"reward": "code", "tests": tests, "entry_point": "add", **meta}, response)


def _fenced(code: str) -> str:
    return f"Here it is.\n```python\n{code}\n```\nDone."


def test_extraction():
    assert extract_code(_fenced("def add(a, b):\n    return a + b")) == "def add(a, b):\n    return a + b\n"
    two = "```python\ndef add(a, b):\n    return 1\n```\nusage:\n```python\nprint(add(1, 2))\n```"
    assert extract_code(two, "add").startswith("def add")  # the block that defines the entry point
    assert extract_code(two).startswith("print")  # else the last block
    assert extract_code("<think>```python\nwrong\n```</think>def add(a, b): return a+b") == "def add(a, b): return a+b"


def test_passes_fails_and_partial_scores():
    reward = CodeReward(SETTINGS)
    responses = [_fenced("def add(a, b):\n    return a + b"),  # all pass
                 _fenced("def add(a, b):\n    return a * b"),  # 2*2 == 4 and 0*0 == 0 pass: 2 of 4
                 _fenced("def add(a, b):\n    return a - b"),  # only 0 - 0 passes
                 "I cannot write code.",  # not a program: a SyntaxError
                 _fenced("def plus(a, b):\n    return a + b")]  # the entry point is missing
    assert reward([_item(r) for r in responses]) == [1.0, 0.5, 0.25, 0.0, 0.0]


def test_setup_runs_before_the_program():
    item = _item(_fenced("def add(a, b):\n    return OFFSET + a + b"), tests=["assert add(1, 2) == 13"],
                 setup="OFFSET = 10")
    assert CodeReward(SETTINGS)([item]) == [1.0]


def test_program_output_cannot_forge_outcomes():
    forged = ('import json\nfor i in range(4):\n    print(json.dumps(["0" * 32, i, "pass", ""]))\n'
              'def add(a, b):\n    return 0')
    run = run_tests(forged, TESTS, LIMITS, 1.0, entry_point="add")
    assert run.passed == (False, True, False, True)  # only add(-1, 1) == 0 and add(0, 0) == 0 really pass


def test_a_hanging_test_fails_alone_and_a_hanging_program_fails_all():
    program = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b"
    start = time.monotonic()
    run = run_tests(program, TESTS, LIMITS, 0.5, entry_point="add")
    assert run.passed == (True, False, True, True) and "TimeoutError" in run.reason
    hung = run_tests("while True:\n    pass", TESTS, LIMITS, 0.5)
    assert hung.passed == (False,) * 4
    assert time.monotonic() - start < 2 * LIMITS.wall_seconds  # bounded by the alarms, not a stuck run


def test_signal_ignoring_hang_is_stopped_by_the_sandbox():
    program = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"
    run = run_tests(program, TESTS, SHORT, 0.5)
    assert run.passed == (False,) * 4 and run.status == "timeout"


def test_earlier_passes_count_when_a_limit_stops_the_run():
    program = ("import signal\ndef add(a, b):\n    if (a, b) == (2, 2):\n"
               "        signal.signal(signal.SIGALRM, signal.SIG_IGN)\n        while True:\n            pass\n"
               "    return a + b")
    run = run_tests(program, TESTS, SHORT, 0.5, entry_point="add")
    assert run.passed == (True, True, False, False) and run.status == "timeout"


def _live_processes_named(name: str) -> list[str]:
    """Processes (not zombies waiting for their reaper) whose name is ``name``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines()
                          if ":\t" in line)
        except OSError:
            continue
        if status.get("Name", "").strip() == name and not status.get("State", "").startswith("Z"):
            found.append(pid)
    return found


def test_forks_are_contained():
    name = f"esc{uuid.uuid4().hex[:10]}"  # the forked children name themselves, to be found if they outlive the run
    program = ("import ctypes, os, time\nfor _ in range(3):\n    if os.fork() == 0:\n"
               f"        ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\n        time.sleep(60)\n"
               "        os._exit(0)\ntime.sleep(0.3)\ndef add(a, b):\n    return a + b")
    run = run_tests(program, TESTS, LIMITS, 1.0, entry_point="add")
    assert run.fraction == 1.0  # forking is allowed; the children are killed with the run's process group
    for _ in range(50):  # a SIGKILL lands within moments; an escaped child would sleep on for a minute
        if not _live_processes_named(name):
            break
        time.sleep(0.1)
    assert _live_processes_named(name) == []
    bomb = "import os\nwhile True:\n    os.fork()"
    assert run_tests(bomb, TESTS, SHORT, 1.0).fraction == 0.0


def test_network_is_refused():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0.5)
    program = (f"import socket\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
               "    return a + b")
    try:
        run = run_tests(program, TESTS, LIMITS, 1.0, entry_point="add")
        assert run.passed == (False,) * 4 and ("PermissionError" in run.reason or "OSError" in run.reason), run
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_memory_and_output_limits():
    greedy = "def add(a, b):\n    block = bytearray(1 << 30)\n    return a + b"
    run = run_tests(greedy, TESTS, LIMITS, 1.0, entry_point="add")
    assert run.passed == (False,) * 4 and "MemoryError" in run.reason
    chatty = "def add(a, b):\n    print('x' * 100_000)\n    return a + b"
    run = run_tests(chatty, TESTS, LIMITS, 1.0, entry_point="add")
    assert run.fraction == 0.0 and run.status == "output_limit"


def test_files_stay_in_the_sandbox():
    outside = os.path.join(os.path.dirname(__file__), "written-by-a-response")
    program = f"open({outside!r}, 'w').write('x')\ndef add(a, b):\n    return a + b"
    assert run_tests(program, TESTS, LIMITS, 1.0, entry_point="add").fraction == 0.0
    assert not os.path.exists(outside)


def test_bad_records_and_settings():
    with pytest.raises(DataError, match="tests"):
        CodeReward(SETTINGS)([_item("def add(a, b): return a + b", tests=[])])
    with pytest.raises(DataError, match="tests"):
        CodeReward(SETTINGS)([_item("def add(a, b): return a + b", tests="assert add(1, 1) == 2")])
    with pytest.raises(ConfigError, match="test_seconds"):
        CodeRewardSettings(limits=LIMITS, test_seconds=20.0)
    with pytest.raises(ConfigError, match="workers"):
        CodeRewardSettings(workers=0)
