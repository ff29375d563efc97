"""The code reward: the response's program against the problem's tests in the sandbox; reward = fraction passed.

The program is the last fenced code block of the response without its thinking (the last one defining
``meta["entry_point"]`` when the problem names one), else the whole answer. One sandbox run per response keeps
it cheap: a harness executes ``meta["setup"]`` (optional), then the program, then each of ``meta["tests"]`` in
the same namespace, each under its own alarm (``test_seconds``: one hanging test fails alone), and prints each
test's outcome as it finishes, so a run killed by a limit (wall clock, CPU, memory, output) still counts the
tests that passed before it. Whatever the program does is bounded by ``nemo_plugins.sandbox`` (no network, no
new programs, CPU / memory / output / file / process limits, temp dir, process group killed).

A program cannot print a passing outcome for a test it did not pass by accident or by imitation: outcome lines
carry a per-run random token given to the harness on stdin, never written to disk. A program that digs the token
out of the harness's frames can forge them (the sandbox is not a VM); a policy learning that is a reward hack to
look for in its samples.

HumanEval uses the same runner (``run_tests``): its prompt plus completion is the program, its ``check`` the test.
"""

from __future__ import annotations

import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from nemo_plugins.data.thinking import split_thinking
from nemo_plugins.errors import DataError
from nemo_plugins.rl.rewards import CodeRewardSettings, RewardItem
from nemo_plugins.sandbox import SandboxLimits, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# the sandbox's main.py: reads the token and the job from stdin, runs them, reports each test on a copy of stdout
# taken before the program runs (a program that replaces sys.stdout does not silence it)
_HARNESS = '''\
import json, os, signal, sys
def _run():
    token = sys.stdin.readline().strip()
    job = json.loads(sys.stdin.readline())
    report, write = os.dup(1), os.write
    def alarm(signum, frame):
        raise TimeoutError("time limit of %g s exceeded" % job["test_seconds"])
    signal.signal(signal.SIGALRM, alarm)
    def timed(source, name, namespace):
        signal.setitimer(signal.ITIMER_REAL, job["test_seconds"])
        try:
            exec(compile(source, name, "exec"), namespace)
            return "pass", ""
        except BaseException as exc:
            return "fail", (type(exc).__name__ + ": " + str(exc))[:200]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    namespace = {"__name__": "solution"}
    outcome, reason = timed(job["setup"] + "\\n" + job["program"], "solution.py", namespace)
    if outcome == "pass" and job["entry_point"] and job["entry_point"] not in namespace:
        outcome, reason = "fail", "the program does not define " + job["entry_point"]
    for index, test in enumerate(job["tests"]):
        result = timed(test, "test_%d.py" % index, namespace) if outcome == "pass" else ("fail", "program: " + reason)
        write(report, json.dumps([token, index, *result]).encode() + b"\\n")
_run()
'''


@dataclass(frozen=True)
class TestRun:
    """Which tests passed, and how the sandbox run ended (its status and reason: a limit, an error, or ok)."""

    passed: tuple[bool, ...]
    status: str
    reason: str

    @property
    def fraction(self) -> float:
        return sum(self.passed) / len(self.passed)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The program in ``response`` (thinking stripped): the last fenced block (defining ``entry_point`` if given
    and some block does), else the whole answer."""
    _, answer = split_thinking(response)
    blocks = _FENCE.findall(answer)
    if not blocks:
        return answer
    if entry_point:
        defining = [block for block in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block)]
        blocks = defining or blocks
    return blocks[-1]


def run_tests(program: str, tests: Sequence[str], limits: SandboxLimits, test_seconds: float, setup: str = "",
              entry_point: str | None = None) -> TestRun:
    """Run ``setup`` + ``program`` then each test in one sandbox run; a test passes when it raises nothing within
    ``test_seconds``. Tests the run never reached (a limit stopped it) count as failed."""
    if not tests:
        raise DataError("a code problem has no tests: meta.tests must list at least one (e.g. 'assert f(1) == 2')")
    token = secrets.token_hex(16)
    job = {"setup": setup, "program": program, "tests": list(tests), "entry_point": entry_point or "",
           "test_seconds": test_seconds}
    result = run_python(_HARNESS, limits, stdin=f"{token}\n{json.dumps(job)}\n")
    passed = [False] * len(tests)
    reasons = []
    for line in result.stdout.splitlines():
        try:
            mark, index, outcome, reason = json.loads(line)
        except (ValueError, TypeError):
            continue  # the program's own output
        if mark == token and isinstance(index, int) and 0 <= index < len(tests):
            passed[index] = outcome == "pass"
            reasons.append(reason)
    reason = result.reason or next((r for r in reasons if r), "")
    return TestRun(tuple(passed), result.status, reason)


class CodeReward:
    """Fraction of ``meta["tests"]`` the response's program passes; runs go ``workers`` at a time."""

    def __init__(self, settings: CodeRewardSettings):
        self.settings = settings

    def run(self, item: RewardItem) -> TestRun:
        meta = item.meta
        tests = meta.get("tests")
        if not isinstance(tests, list) or not all(isinstance(test, str) for test in tests):
            raise DataError(f"a code problem's meta.tests must be a list of test sources, got {tests!r}")
        entry_point = meta.get("entry_point")
        return run_tests(extract_code(item.response, entry_point), tests, self.settings.limits,
                         self.settings.test_seconds, meta.get("setup") or "", entry_point)

    def __call__(self, items: Sequence[RewardItem]) -> list[float]:
        with ThreadPoolExecutor(self.settings.workers) as pool:
            return [run.fraction for run in pool.map(self.run, items)]
