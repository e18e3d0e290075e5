"""The web view in a real browser (Debian's chromium through chromedriver, headless) while
simulated jobs run: a real coordinator process and agent processes, as `cio-worker simulate` runs
them. The job page's progress rises to 100 % without a reload and a thumbnail loads; a failed
task shows its reason and log; retry and kill change what the queue holds; without the session
the browser is sent to sign in. Screenshots of each page go to /tmp/cio-screens/."""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from cio_worker.queue import open_queue
from cio_worker.sim.examples import example_job_path, example_root
from cio_worker.sim.simulate import Simulation, SimulationConfig, SimulationSummary
from tests.waiting import wait_for

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="chromium or chromedriver is missing (apt-get install chromium chromium-driver)"),
]
SCREENS = Path("/tmp/cio-screens")


class Lines(io.TextIOBase):
    """The simulation's output, readable while it runs in another thread."""

    def __init__(self) -> None:
        self.text = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.text += text
        return len(text)

    def find(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = re.search(pattern, self.text)
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in the simulation's output:\n{self.text[-3000:]}")


class Running:
    """A simulation in a thread that keeps its coordinator (and web view) up after the job until
    ``close``; its address, owner token and job id once they are known."""

    def __init__(self, work: Path, **config: Any) -> None:
        self.out = Lines()
        self.ended = threading.Event()  # the job ended and the agents stopped
        self.leave = threading.Event()
        self.summary: SimulationSummary | None = None
        self.error: BaseException | None = None
        config.setdefault("job_spec", example_job_path())
        settings = SimulationConfig(source_root=example_root(), work_dir=work, timeout_seconds=300, **config)
        self.simulation = Simulation(settings, out=self.out)
        self.thread = threading.Thread(target=self._run, name="simulation", daemon=True)
        self.thread.start()
        self.url = self.out.find(r"web view at (http://\S+)/ ")[1]
        self.token = (work / "owner.token").read_text().strip()
        self.job = self.out.find(r"submitted job (\d+)")[1]

    def _run(self) -> None:
        def hold(summary: SimulationSummary) -> None:
            self.summary = summary
            self.ended.set()
            self.leave.wait(600)
        try:
            self.simulation.run(keep_open=hold)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.ended.set()

    def wait_ended(self, timeout: float = 300) -> SimulationSummary:
        assert self.ended.wait(timeout), self.out.text[-3000:]
        assert self.error is None and self.summary is not None, (self.error, self.out.text[-3000:])
        return self.summary

    def close(self) -> None:
        self.leave.set()
        self.thread.join(60)


@contextmanager
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: Any, url: str, token: str) -> None:
    driver.get(url + "/")
    assert "/sign-in" in driver.current_url  # no session: sent to sign in
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#sign-in button").click()
    wait_for(lambda: "/sign-in" not in driver.current_url, 20, "the sign-in")


def screenshot(driver: Any, name: str, height: int | None = None) -> None:
    SCREENS.mkdir(parents=True, exist_ok=True)
    whole = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height or whole, 700), 3000))
    driver.save_screenshot(str(SCREENS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def percent(driver: Any) -> int | None:
    text = driver.execute_script("const p = document.querySelector('#job-head .percent'); return p && p.textContent;")
    return int(text.split()[0]) if text else None


def test_a_running_jobs_page_rises_to_100_percent_and_shows_its_frames(tmp_path: Path) -> None:
    run = Running(tmp_path / "sim", workers=2, frame_seconds=1.0)
    try:
        with browser() as driver:
            sign_in(driver, run.url, run.token)
            driver.get(f"{run.url}/jobs/{run.job}")
            driver.execute_script("window.notReloaded = true;")
            seen: list[int] = []
            shots = set()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                value = percent(driver)
                if value is not None and (not seen or value != seen[-1]):
                    seen.append(value)
                if value == 100:
                    break
                if "running" not in shots and driver.find_elements(By.CSS_SELECTOR, "#grid .c.l") and value:
                    shots.add("running")
                    screenshot(driver, "job-running")
                    driver.get(f"{run.url}/workers")
                    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".ws-rendering, .ws-syncing, .ws-uploading"),
                          20, "a busy worker")
                    screenshot(driver, "workers")
                    driver.get(run.url + "/")
                    screenshot(driver, "jobs-running")
                    driver.get(f"{run.url}/jobs/{run.job}")
                    driver.execute_script("window.notReloaded = true;")
                time.sleep(0.3)
            assert seen and seen[-1] == 100, (seen, run.out.text[-2000:])
            assert any(v < 100 for v in seen), seen  # it rose while we watched
            assert seen == sorted(seen), seen
            assert driver.execute_script("return window.notReloaded === true;")  # live, not reloaded
            # Every cell done; a thumbnail of a frame has loaded.
            wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, "#grid .c:not(.d)"), 30, "every cell done")
            driver.execute_script("document.getElementById('gallery').scrollIntoView();")
            wait_for(lambda: driver.execute_script(
                "return Array.from(document.querySelectorAll('#gallery img')).some(i => i.complete && i.naturalWidth > 0);"),
                30, "a loaded thumbnail")
            screenshot(driver, "job-done")
            driver.get(run.url + "/")
            wait_for(lambda: "done" in driver.find_element(By.CSS_SELECTOR, "tr.job .state").text, 20, "job done")
            screenshot(driver, "jobs")
            driver.get(f"{run.url}/jobs/{run.job}")
            driver.find_element(By.CSS_SELECTOR, f"a[href^='/jobs/{run.job}/frames/']").click()  # full size
            wait_for(lambda: driver.execute_script(
                "return Array.from(document.querySelectorAll('.full img')).every(i => i.complete && i.naturalWidth > 0);"),
                20, "the full-size frame")
            # The example's images are 64 x 48 (a tiled one: four 32 x 24 tiles in their places).
            wait_for(lambda: driver.find_element(By.ID, "frame-size").text == "64 × 48 pixels.", 20, "the frame's size")
            driver.find_element(By.ID, "fit").click()  # fits the window: 48 rows become 85 % of its height
            fitted = driver.execute_script("return [document.getElementById('full').getBoundingClientRect().height,"
                                           " window.innerHeight];")
            assert abs(fitted[0] - 0.85 * fitted[1]) < 0.05 * fitted[1], fitted
            screenshot(driver, "frame")
        summary = run.wait_ended()
        assert summary.done == summary.tasks == 20
    finally:
        run.close()


def test_a_failed_task_shows_its_reason_and_log_and_retry_and_kill_change_the_queue(tmp_path: Path) -> None:
    # Frame 7 (a scout frame) fails on every agent: its tasks fail for good after their retries.
    # Each failing task fails once and blocks no worker (with the example's policy both agents can
    # end up blocked from the job, which then waits for a third). Short long polls: a claim the
    # coordinator still holds for a stopped agent ends within a second (one held longer could lease
    # the retried tasks to an agent that is gone).
    spec = tmp_path / "job.toml"
    spec.write_text(re.sub(r"\[autoretry_policy\][^\[]*", "[autoretry_policy]\npreempted = 3\nfailed = {max_retries = 0, "
                           "distinct_workers = 1, block_worker_after = 0}\n\n", example_job_path().read_text()))
    run = Running(tmp_path / "sim", workers=2, frame_seconds=0.1, agent_env={"CNODE_SIM_FAIL": "frame:7"},
                  long_poll_seconds=1.0, job_spec=spec)
    try:
        with browser() as driver:
            sign_in(driver, run.url, run.token)
            summary = run.wait_ended()
            assert summary.failed > 0, run.out.text[-2000:]
            time.sleep(2)  # the stopped agents' last long polls have ended
            with open_queue(run.simulation.database_url) as queue:
                failed = [t for t in queue.tasks(run.job) if t.state == "failed"]
            task = failed[0]
            driver.get(f"{run.url}/jobs/{run.job}")
            cells = driver.find_elements(By.CSS_SELECTOR, "#grid .c")
            assert len(cells) == summary.tasks
            assert "f" in cells[int(task.id)].get_attribute("class").split()
            cells[int(task.id)].click()  # a task opens its attempts and log
            wait_for(lambda: f"/tasks/{task.id}" in driver.current_url, 20, "the task page")
            reason = driver.find_element(By.ID, "task-reason").text
            assert reason and reason.split(" (log:")[0][:40] in task.reason
            log = driver.find_element(By.ID, "log").text
            assert "failed at frame 7: simulated render failure" in log, log[-2000:]  # cnode's own line
            assert len(driver.find_elements(By.CSS_SELECTOR, "table.attempts tr.o-failed")) >= 1
            screenshot(driver, "task")

            # Retry puts the failed tasks back to pending (the agents have stopped: they stay so).
            driver.get(f"{run.url}/jobs/{run.job}")
            driver.find_element(By.ID, "retry").click()
            wait_for(lambda: "pending again" in driver.page_source, 20, "the retry's note")
            with open_queue(run.simulation.database_url) as queue:
                states = {t.id: t.state for t in queue.tasks(run.job)}
            assert all(states[t.id] == "pending" for t in failed), {t.id: states[t.id] for t in failed}
            # Kill (after its confirmation) fails them "killed by owner".
            driver.find_element(By.ID, "kill").click()
            driver.switch_to.alert.accept()
            wait_for(lambda: "killed the job" in driver.page_source, 20, "the kill's note")
            with open_queue(run.simulation.database_url) as queue:
                tasks = {t.id: t for t in queue.tasks(run.job)}
                assert next(j for j in queue.jobs() if j.id == run.job).killed
            assert all(tasks[t.id].state == "failed" and tasks[t.id].reason == "killed by owner" for t in failed), \
                {t.id: (tasks[t.id].state, tasks[t.id].reason) for t in failed}

            # Without the session: the browser is sent to sign in, a program is refused.
            driver.delete_all_cookies()
            driver.get(f"{run.url}/jobs/{run.job}")
            assert "/sign-in" in driver.current_url
            screenshot(driver, "sign-in")
            assert requests.get(f"{run.url}/live/jobs/{run.job}", timeout=30).status_code == 401
            assert requests.post(f"{run.url}/jobs/{run.job}/retry", timeout=30).status_code == 401
    finally:
        run.close()
