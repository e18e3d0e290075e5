"""Never bill for nothing: an agent that cannot start work retries for a bounded time, then gives up.

``start_or_give_up(start, policy)`` calls ``start`` until it returns, retrying any failure after a
growing, jittered wait (tenacity) while less than ``policy().after`` seconds have passed since the
first failure; then it runs ``policy().command`` (``systemctl poweroff``, or a marker file the
service's unit acts on) and raises ``GaveUp``. The first failure's time is kept in
``policy().state_file`` (in the work directory) with the boot it happened in, so a supervisor
that restarts the agent does not restart the clock: a restarted agent already past the bound tries
once and gives up at once if that fails. A start that succeeds removes the file. With ``after``
0 and no command, the first failure is raised as it is (a person at a terminal).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from cio_worker.errors import CioError

logger = logging.getLogger(__name__)

T = TypeVar("T")
GAVE_UP_EXIT_STATUS = 69  # EX_UNAVAILABLE (sysexits.h): what a service's unit sees once the agent gave up
STATE_FILE_NAME = "start-failures.json"
COMMAND_TIMEOUT = 120.0


class GaveUp(CioError):
    code = "gave_up"


@dataclass(frozen=True)
class GiveUpPolicy:
    after: float  # seconds of failed starts before giving up (0: at the first failure)
    command: str | None = None  # a shell command run on giving up
    state_file: Path | None = None  # where the first failure is kept across restarts
    max_wait: float = 60.0  # the longest wait between two attempts

    def wait_cap(self) -> float:
        return min(self.max_wait, max(0.5, self.after / 10))


def boot_id() -> str:
    """This boot's id (Linux); a first failure recorded in another boot does not count."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class _Failures:
    first: float | None = None
    error: BaseException | None = None
    attempts: int = 0  # in this process
    policy: GiveUpPolicy = GiveUpPolicy(0.0)


def _remember(failures: _Failures, now: float, boot: str, error: BaseException, log: logging.Logger) -> None:
    """Set ``failures.first``: the earliest failure known (this process's, or the state file's if
    it is from this boot), and keep it in the state file."""
    policy = failures.policy
    first = now if failures.first is None else failures.first
    if policy.after <= 0 or policy.state_file is None:
        failures.first = first
        return
    path = policy.state_file
    count = 1
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("boot_id") == boot and isinstance(record.get("first_failure"), (int, float)):
            first = min(first, float(record["first_failure"]))
            count = int(record.get("failures", 0)) + 1
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # none yet, another boot's, or unreadable: this failure starts the count
    failures.first = first
    record = {"first_failure": first, "boot_id": boot, "failures": count, "last_error": str(error)[:2000]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        partial.write_text(json.dumps(record), encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:  # a full disk, say: the bound then holds for this process only
        log.warning("cannot keep the start failures in %s (%s); a restart would start the count again", path, exc)


def run_give_up_command(command: str, reason: str, log: logging.Logger = logger) -> int | None:
    """Run ``command`` in a shell with $CIO_GIVE_UP_REASON; its exit status, None if it could not run."""
    log.error("running the give-up command: %s", command)
    try:
        done = subprocess.run(command, shell=True, check=False, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "CIO_GIVE_UP_REASON": reason})
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("the give-up command could not run: %s", exc)
        return None
    if done.returncode != 0:
        log.error("the give-up command exited with %d", done.returncode)
    return done.returncode


def start_or_give_up(
    start: Callable[[], T],
    policy: Callable[[], GiveUpPolicy],
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    boot: Callable[[], str] = boot_id,
    on_wait: Callable[[str, float], None] = lambda status, seconds: None,
    run_command: Callable[[str, str], int | None] | None = None,
    log: logging.Logger = logger,
) -> T:
    """``start()``'s result once it succeeds; GaveUp once it has failed for ``policy().after`` s.

    ``policy`` is asked after each failure (a configuration fixed meanwhile may move the state
    file or change the bound) and after the success (whose state file is cleared). ``clock`` is
    wall time: it is compared with times other processes recorded. ``on_wait(status, seconds)``
    hears of each wait (systemd's STATUS and start timeout).
    """
    failures = _Failures()
    this_boot = boot()

    def attempt() -> T:
        failures.attempts += 1
        try:
            return start()
        except Exception as exc:
            failures.error = exc
            try:
                failures.policy = policy()
            except Exception:  # noqa: BLE001 - the last policy known stands
                log.exception("reading the give-up settings failed")
            if failures.first is None and not isinstance(exc, (CioError, OSError)):
                log.exception("starting failed unexpectedly")
            _remember(failures, clock(), this_boot, exc, log)
            raise

    def left() -> float:
        assert failures.first is not None
        return failures.first + failures.policy.after - clock()

    def wait(state: RetryCallState) -> float:
        backoff = wait_random_exponential(multiplier=0.5, max=failures.policy.wait_cap())(state)
        return max(0.0, min(backoff, left()))

    def before_sleep(state: RetryCallState) -> None:
        seconds = state.next_action.sleep if state.next_action else 0.0
        status = (f"cannot start work: {_one_line(failures.error)}; trying again in {seconds:.1f} s, "
                  f"giving up in {max(0.0, left()):.0f} s")
        log.warning("%s (attempt %d)", status, state.attempt_number)
        on_wait(status, seconds)

    retrying = Retrying(
        retry=retry_if_exception_type(Exception),
        stop=lambda state: left() <= 0,
        wait=wait,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        result = retrying(attempt)
    except Exception as exc:
        return _give_up(exc, failures, clock(), run_command, log)
    try:
        done = policy()
    except Exception:  # noqa: BLE001
        done = failures.policy
    for path in {done.state_file, failures.policy.state_file} - {None}:
        try:
            path.unlink(missing_ok=True)  # type: ignore[union-attr]
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
    return result


def _give_up(error: Exception, failures: _Failures, now: float,
             run_command: Callable[[str, str], int | None] | None, log: logging.Logger):
    policy = failures.policy
    if policy.after <= 0 and not policy.command:
        raise error  # nothing to wait for and nothing to run: the error as it is
    assert failures.first is not None
    reason = (f"cannot start work for {now - failures.first:.0f} s ({failures.attempts} attempts in this process): "
              f"{_one_line(error)}")
    log.error("%s; giving up", reason)
    if policy.command:
        status = (run_command or (lambda command, why: run_give_up_command(command, why, log)))(policy.command, reason)
        ran = f"; ran the give-up command ({'exit status ' + str(status) if status is not None else 'could not run'})"
    else:
        ran = "; no give-up command is set (give_up_command)"
    raise GaveUp(f"gave up: {reason}{ran}") from error


def _one_line(error: BaseException | None) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:500] + "..."
