"""The lines that end a render are seen: the runner hands the monitor only the lines its filter
selects (MONITORED_LINES), so each fatal wording needs a hint word as well as a pattern. Real
wordings: the C++ runtime's bad_alloc, the kernel's ENOMEM text, RLM's checkout errors (its status
table: RLM_EL_NOPRODUCT "No authorization for product", RLM_EL_EXPIRED "Authorization has
expired", RLM_EL_NOTTHISHOST "Wrong host for authorization", "All licenses in use")."""

from __future__ import annotations

import os
import sys

import pytest

from cio_worker.node.clarisse import MONITORED_LINES, RenderMonitor
from cio_worker.node.runner import ProcessRunner, RunSpec


@pytest.mark.parametrize(("line", "code"), [
    ("Out of memory: could not allocate 12.4 GB for the geometry cache", "out_of_memory"),
    ("terminate called after throwing an instance of 'std::bad_alloc'", "out_of_memory"),
    ("mmap: Cannot allocate memory", "out_of_memory"),
    ("RLMSTAT(U): (clarisse) 5053@lic01: No authorization for product (-1)", "licence"),
    ("RLMSTAT(N): (clarisse) /opt/isotropix/licence: Authorization has expired (-3)", "licence"),
    ("RLMSTAT(N): (clarisse) /opt/isotropix/licence: Wrong host for authorization (-4)", "licence"),
    ("License denied for product cnode", "licence"),
    ("All licenses in use for product clarisse", "licence"),
])
def test_a_fatal_line_reaches_the_monitor_through_the_runner(tmp_path, line, code):
    monitor = RenderMonitor(None)  # type: ignore[arg-type]  (feed needs no prepared job)
    script = f"import sys\nprint('[render] bucket 1 ok')\nprint({line!r})\nprint('[render] bucket 2 ok')\n"
    spec = RunSpec([sys.executable, "-c", script], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                   log_path=tmp_path / "task.log")
    result = ProcessRunner().start(spec, on_line=monitor.feed, line_filter=MONITORED_LINES).wait(timeout=60)
    assert result.exit_code == 0
    assert monitor.fatal == (code, line)


@pytest.mark.parametrize("line", [
    "License server: lic01 (port 5053), 3 of 10 licenses in use",
    "Checking out a license for cnode",
    "Memory: 3.1 GB used of 64 GB",
    # cnode's echo of its arguments: a licence server and a path that happens to say "fail"
    "[INFO] Command line: cnode shot.project -license_server lic01:40500 -config_file /tmp/fail/clarisse.cfg",
    "Using license server lic01:5053 from /srv/failover.cfg",
])
def test_ordinary_licence_and_memory_chatter_is_not_fatal(tmp_path, line):
    monitor = RenderMonitor(None)  # type: ignore[arg-type]
    spec = RunSpec([sys.executable, "-c", f"print({line!r})"], cwd=tmp_path, env={"PATH": os.environ["PATH"]},
                   log_path=tmp_path / "task.log")
    ProcessRunner().start(spec, on_line=monitor.feed, line_filter=MONITORED_LINES).wait(timeout=60)
    assert monitor.fatal is None
