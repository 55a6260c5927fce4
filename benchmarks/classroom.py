"""A class at once: N visitors and the operator on one served app, each in their own browser context.

The operator arrives first, signs in and opens every page once, as a teacher does before the class (the
server's first visit imports and caches what every later page shares); then the visitors arrive, one every
``--stagger`` seconds. All the browsers run on this machine beside the server and the training workers, so
the page times include rendering 30 pages on the same two cores, which a class's own laptops would do.

Serves the app with `streamlit run Home.py` and an operator passphrase (a hosted class: every visitor gets a
workspace of their own), a data root holding a training set and the class's locked test set, the demo run,
and a lesson written for this test. Each visitor, in headless Chromium, does what a lesson does: opens Home
and Lessons, starts the lesson, opens Training from its action and trains a quick run through the queue,
waits for it, opens Evaluation from the next step, classifies five images on Predict and submits the run to
the Leaderboard. The operator signs in and keeps the class table open meanwhile. Features are cached once
before the class (a teacher's rehearsal run), as they would be for a class that meets twice.

    .venv/bin/python -m benchmarks.classroom --visitors 30                 # Kermany (../shared), 128 px
    .venv/bin/python -m benchmarks.classroom --visitors 3 --data practice  # offline: the synthetic sets

Prints one JSON line: visitors, runs_done, runs_failed, errors_shown (every exception or error box a
visitor saw), steps_timed_out (steps this driver gave up waiting for, with no error shown; a screenshot of
each goes to benchmarks/results/classroom-stuck/), wall_s (first click to the last visitor's end),
runs_wall_s (first click to the last run done), page_p95_s (a click to the page settled, over all
visitors' page loads), server_rss_peak_mb (the
Streamlit process alone) and workers_rss_peak_mb (the largest training process). The whole result, with
every page time and error text, goes to benchmarks/results/classroom-<time>.json.

Targets (issue "A class of thirty"): 30 visitors, every run done, nothing failed or shown; the runs done
within 10 minutes of the first click; page p95 at most 3 s; the server at most 1 GB, each worker 1.5 GB.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.appserver import CHROMIUM, CHROMIUM_FLAGS, ROOT, SHARED, log, serve

PASSPHRASE = "classroom benchmark passphrase 42"
LESSON_ID = "classroom"
KERMANY = SHARED / "data" / "kermany224"
KERMANY_TEST = SHARED / "data" / "kermany224-test-dev"
KERMANY_WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_224_no_top_imagenet.weights.h5"
IMAGE_SIZE = 128
#: How long a visitor waits for their run at most (the target: the whole class's runs within 10 minutes).
RUN_TIMEOUT_S = 12 * 60
#: How long a visitor waits for a page or a click to answer before the driver counts the step as stuck.
PATIENCE_MS = 180_000
SHOTS = ROOT / "benchmarks" / "results" / "classroom-stuck"
ERROR_SELECTOR = "[data-testid='stException'], [data-testid='stAlertContentError']"

LESSON = """---
id: {lesson_id}
title: A class run
goal: Train a quick run, look at it, classify a few X-rays and put it on the class leaderboard.
minutes: 15
order: 1
steps:
  - title: Train a quick run
    action:
      page: training
      label: Open Training for the class run
      settings:
        dataset: {dataset}
        train.recipe: quick
        model.backbone: mobilenet_v2
        model.alpha: 0.35
        model.image_size: {size}
    check:
      kind: run_exists
      settings:
        train.recipe: quick
  - title: Look at it
    action:
      page: evaluation
      label: Open Evaluation on the class run
      settings:
        run:
          train.recipe: quick
---
## Train a quick run
Train the quick recipe on the class data set; it waits in the queue while the places are taken.

## Look at it
Open your run on the Evaluation page.
"""


# --- The class: data root, runs root, lesson, weights ----------------------------------------------------
def prepare(work: Path, data: str) -> dict:
    """Make the folders the server reads and return its environment. The locked test set is the operator's
    choice, written before the class starts."""
    data_root, runs_root, lessons = work / "data", work / "runs", work / "lessons"
    for folder in (data_root, runs_root, lessons):
        folder.mkdir(parents=True, exist_ok=True)
    weights_dir = work / "weights"
    weights_dir.mkdir(exist_ok=True)
    if data == "kermany":
        if not KERMANY.is_dir() or not KERMANY_TEST.is_dir() or not KERMANY_WEIGHTS.is_file():
            raise SystemExit(f"The Kermany data and weights are not under {SHARED}; use --data practice.")
        train_name, locked_name = KERMANY.name, KERMANY_TEST.name
        _link(KERMANY, data_root / train_name)
        _link(KERMANY_TEST, data_root / locked_name)
        shutil.copy2(KERMANY_WEIGHTS, weights_dir / KERMANY_WEIGHTS.name)
    else:
        from cxr_core.data import practice

        train_name = practice.make_practice_dataset(data_root, n_normal=40, n_pneumonia=80, size=IMAGE_SIZE).name
        locked = practice.make_practice_dataset(data_root / "practice-locked-test", n_normal=30, n_pneumonia=30,
                                                size=IMAGE_SIZE, seed=7)
        locked_name = locked.relative_to(data_root).parts[0]
        _random_weights(weights_dir / "mobilenet_v2_0.35_224_no_top_random.weights.h5")
    (lessons / f"{LESSON_ID}.md").write_text(
        LESSON.format(lesson_id=LESSON_ID, dataset=train_name, size=IMAGE_SIZE), encoding="utf-8")
    secrets = work / "secrets.toml"
    secrets.write_text(f'operator_passphrase = "{PASSPHRASE}"\n', encoding="utf-8")
    return {"env": {"CXR_DATA_ROOT": str(data_root), "CXR_RUNS_DIR": str(runs_root),
                    "CXR_CACHE_DIR": str(work / "cache"), "CXR_WEIGHTS_DIR": str(weights_dir),
                    "CXR_LESSONS_DIR": str(lessons), "CXR_DEMO_RUN": str(ROOT / "artifacts" / "demo-mobilenet")},
            "secrets": secrets, "train": train_name, "locked": locked_name, "weights": weights_dir}


def _link(source: Path, target: Path) -> None:
    """A symbolic link where the system allows one (Windows may not), else a copy."""
    try:
        target.symlink_to(source, target_is_directory=True)
    except OSError:
        shutil.copytree(source, target)


def _random_weights(path: Path) -> None:
    """Offline there are no ImageNet weights: a file of random ones, named as Keras names them, stands in.
    Made in this process (a test process has TensorFlow loaded already; a new one would import it again)."""
    import keras

    keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=0.35, include_top=False,
                                   weights=None).save_weights(str(path))


def set_up_class(env: dict, locked: str, jobs_at_once: int) -> None:
    """The operator's choices before the class: the locked test set and the jobs that run at once."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from cxr_core.hosting import classroom, job_queue

        job_queue.set_max_concurrent(jobs_at_once)
        classroom.update(locked_test_set=locked)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def rehearse(env: dict, train: str, weights_dir: Path, work: Path) -> float:
    """The teacher's rehearsal: one quick run from the command line, which fills the shared feature cache."""
    weights = next(weights_dir.glob("*.h5"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cxr_core", "train", "--recipe", "quick", "--data",
                    str(Path(env["CXR_DATA_ROOT"]) / train), "--backbone", "mobilenet_v2", "--alpha", "0.35",
                    "--image-size", str(IMAGE_SIZE), "--weights", str(weights), "--out", str(work / "rehearsal")],
                   check=True, cwd=ROOT, env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3"},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


# --- Memory -----------------------------------------------------------------------------------------------
class Memory:
    """Peak RSS of the server process alone and of its largest child (a training worker), sampled in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.server, self.worker = pid, 0.0, 0.0
        self.cpu_s, self.wall_s = 0.0, 0.0  # the server process's CPU time while the class ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                server = psutil.Process(self.pid)
                self.server = max(self.server, server.memory_info().rss / 2**20)
                for child in server.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        self.worker = max(self.worker, child.memory_info().rss / 2**20)
            self._stop.wait(0.5)

    def _cpu(self) -> float:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.pid).cpu_times()
            return times.user + times.system
        return 0.0

    def __enter__(self) -> Memory:
        self._cpu_start, self._wall_start = self._cpu(), time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.cpu_s, self.wall_s = self._cpu() - self._cpu_start, time.monotonic() - self._wall_start
        self._stop.set()
        self._thread.join()


# --- A visitor in the browser -----------------------------------------------------------------------------
class Visitor:
    """One person's browser context: every page load timed, every error box kept."""

    def __init__(self, name: str, context, base: str) -> None:
        self.name, self.context, self.base = name, context, base
        self.page = None
        self.loads: list[tuple[str, float]] = []
        self.errors: list[str] = []   # error boxes and exceptions the visitor saw
        self.stuck: list[str] = []    # steps the driver gave up waiting for (no error was shown)
        self.step = "start"
        self.outcome = "not started"
        self.submitted_at: float | None = None
        self.done_at: float | None = None

    async def settle(self, timeout_s: float = 300.0, quiet_s: float = 1.0) -> None:
        """Until the page has a title and its script has stopped running for ``quiet_s`` seconds."""
        page = self.page
        await page.wait_for_selector("[data-testid='stApp']", timeout=timeout_s * 1000)
        await page.wait_for_selector("h1", timeout=timeout_s * 1000)
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            if await page.locator("[data-testid='stStatusWidget']").count() > 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            await asyncio.sleep(0.4)
        raise TimeoutError(f"{self.name}: the page was still running after {timeout_s:.0f} s")

    async def timed(self, what: str, action) -> None:
        """Do ``action`` (a click, a navigation) and time it until the page has settled; keep any error shown.
        The settle's own quiet time is not counted."""
        self.step = what
        started = time.monotonic()
        await action()
        await self.settle()
        self.loads.append((what, time.monotonic() - started - 1.0))
        await self.collect_errors(what)

    async def snapshot(self) -> None:
        """A screenshot of where this visitor is stuck, for a person to look at (benchmarks/results/)."""
        with contextlib.suppress(Exception):
            SHOTS.mkdir(parents=True, exist_ok=True)
            await self.page.screenshot(path=str(SHOTS / f"{self.name}-{self.step.replace(' ', '_')}.png"),
                                       full_page=True)

    async def collect_errors(self, where: str) -> None:
        boxes = self.page.locator(ERROR_SELECTOR)
        for i in range(await boxes.count()):
            text = (await boxes.nth(i).inner_text()).strip().splitlines()
            self.errors.append(f"{where}: {text[0] if text else '(empty)'}")

    async def menu(self, title: str) -> None:
        await self.page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
        await self.page.wait_for_function(
            f"() => [...document.querySelectorAll('h1')].some(h => h.innerText.includes({json.dumps(title)}))",
            timeout=PATIENCE_MS)

    async def lesson(self, images: list[str]) -> None:
        page = self.page = await self.context.new_page()
        await self.timed("home", lambda: page.goto(self.base, wait_until="domcontentloaded"))
        await self.timed("lessons", lambda: self.menu("Lessons"))
        await self.timed("lesson start", lambda: page.get_by_role("button", name="Start").first.click())
        await self.timed("training (lesson action)",
                         lambda: page.get_by_role("button", name="Open Training for the class run").click())
        start = page.get_by_role("button", name="Start training").or_(
            page.get_by_role("button", name="Add to the queue"))
        self.submitted_at = time.time()
        await self.timed("train", lambda: start.first.click())
        self.outcome = await self.wait_for_run()
        self.done_at = time.time()
        await self.timed("lessons again", lambda: self.menu("Lessons"))
        await self.timed("lesson next", lambda: page.get_by_role("button", name="Next").click())
        await self.timed("evaluation (lesson action)",
                         lambda: page.get_by_role("button", name="Open Evaluation on the class run").click())
        await self.timed("predict", lambda: self.menu("Predict"))
        await self.timed("classify 5", lambda: page.locator("input[type='file']").first.set_input_files(images))
        await self.timed("leaderboard", lambda: self.menu("Leaderboard"))
        if self.outcome == "done":
            await self.timed("submit", lambda: page.get_by_role("button", name="Submit to the board").click())

    async def wait_for_run(self) -> str:
        """The Training page's run panel updates by itself; wait until it says finished or failed."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        page = self.page
        while time.monotonic() < deadline:
            if await page.get_by_text("Finished:").count():
                return "done"
            for word in ("failed", "Failed", "cancelled"):
                if await page.locator("[data-testid='stAlertContentError']").filter(has_text=word).count():
                    await self.collect_errors("training")
                    return "failed"
            await asyncio.sleep(2.0)
        self.stuck.append("training: the run did not finish in time")
        await self.snapshot()
        return "timeout"


async def operator_arrives(context, base: str) -> Visitor:
    """The teacher, before the class: signs in and opens every page once (the server's first visit imports
    and caches what every later page shares)."""
    teacher = Visitor("operator", context, base)
    page = teacher.page = await context.new_page()
    await teacher.timed("home", lambda: page.goto(base, wait_until="domcontentloaded"))
    field = page.get_by_label("Operator passphrase", exact=True)
    await field.fill(PASSPHRASE)
    await teacher.timed("sign in", lambda: field.press("Enter"))
    for title in ("Lessons", "Dataset", "Training", "Evaluation", "Predict", "Leaderboard"):
        await teacher.timed(title.lower(), lambda title=title: teacher.menu(title))
    return teacher


async def operator(teacher: Visitor, stop: asyncio.Event, loads: list) -> None:
    """The teacher during the class: looks at the class table on the Lessons page every 20 seconds."""
    while not stop.is_set():
        await teacher.timed("class table", lambda: teacher.menu("Lessons"))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 20)
    loads.extend(teacher.loads)


async def drive(base: str, n: int, images: list[str], stagger_s: float) -> dict:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            stop = asyncio.Event()
            operator_loads: list = []
            arrived = await operator_arrives(await browser.new_context(viewport={"width": 1300, "height": 900}), base)
            warm_up = list(arrived.loads)
            arrived.loads.clear()
            teacher = asyncio.create_task(operator(arrived, stop, operator_loads))
            visitors = [Visitor(f"visitor-{i + 1}", await browser.new_context(viewport={"width": 1300, "height": 900}),
                                base) for i in range(n)]
            for visitor in visitors:  # a patient person: three minutes for anything to answer before giving up
                visitor.context.set_default_timeout(PATIENCE_MS)
                visitor.context.set_default_navigation_timeout(PATIENCE_MS)
            started = time.time()

            async def one(i: int, visitor: Visitor) -> None:
                await asyncio.sleep(i * stagger_s)
                try:
                    await visitor.lesson(images)
                except Exception as error:  # noqa: BLE001 - a visitor's failure is a result, not the end of the run
                    visitor.stuck.append(f"{visitor.step}: {type(error).__name__}: {str(error).splitlines()[0]}")
                    await visitor.collect_errors(visitor.step)
                    await visitor.snapshot()
                    if visitor.outcome == "not started":
                        visitor.outcome = "stuck"

            await asyncio.gather(*(one(i, v) for i, v in enumerate(visitors)))
            ended = time.time()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(teacher, 120)
        finally:
            await browser.close()
    return {"started": started, "ended": ended, "visitors": visitors, "operator_loads": operator_loads,
            "warm_up": warm_up}


def run_states(runs_root: Path) -> dict[str, int]:
    """How the visitors' runs ended, read from their status files (the rehearsal and the demo are elsewhere)."""
    counts: dict[str, int] = {}
    for status in runs_root.rglob("status.json"):
        try:
            state = json.loads(status.read_text(encoding="utf-8")).get("state", "unknown")
        except (OSError, ValueError):
            state = "unreadable"
        counts[state] = counts.get(state, 0) + 1
    return counts


def runs_off_the_lesson(runs_root: Path) -> list[str]:
    """The visitors' runs whose settings are not the lesson's (the quick recipe: a patient split, class
    weights): a lesson action whose settings were lost on the way to the Training page shows here."""
    off = []
    for config_file in (runs_root / "workspaces").rglob("config.json"):
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            off.append(f"{config_file.parent.name}: config unreadable")
            continue
        split, balance = config.get("data", {}).get("split"), config.get("train", {}).get("balance")
        if (split, balance) != ("patient", "class_weight"):
            off.append(f"{config_file.parent.name}: split {split}, balance {balance}")
    return off


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def classroom(n: int, data: str, work: Path, jobs_at_once: int, stagger_s: float, resident: bool,
              rehearsal: bool = True) -> dict:
    """``rehearsal``: fill the feature cache before the class (without it the first visitor's run does)."""
    ready = prepare(work, data)
    env = {**ready["env"], "CXR_RESIDENT_WORKERS": "1" if resident else "0"}
    set_up_class(env, ready["locked"], jobs_at_once)
    rehearsal_s = 0.0
    if rehearsal:
        log("rehearsal run (fills the feature cache)")
        rehearsal_s = rehearse(env, ready["train"], ready["weights"], work)
    images = [str(p) for p in sorted((Path(env["CXR_DATA_ROOT"]) / ready["train"]).rglob("*.jpeg"))[:5]]
    images = images or [str(p) for p in sorted((Path(env["CXR_DATA_ROOT"]) / ready["train"]).rglob("*.png"))[:5]]
    log(f"serving the class: {n} visitors, {jobs_at_once} jobs at once")
    secrets = ["--secrets.files", str(ready["secrets"])]
    with serve(env, work / "server.log", extra_args=secrets) as (base, server), Memory(server.pid) as memory:
        driven = asyncio.run(drive(base, n, images, stagger_s))
    visitors: list[Visitor] = driven["visitors"]
    loads = [seconds for v in visitors for _, seconds in v.loads]
    done_times = [v.done_at for v in visitors if v.outcome == "done" and v.done_at]
    states = run_states(Path(env["CXR_RUNS_DIR"]))
    errors = [f"{v.name}: {e}" for v in visitors for e in v.errors]
    stuck = [f"{v.name}: {e}" for v in visitors for e in v.stuck]
    return {
        "visitors": n,
        "runs_done": states.get("done", 0),
        "runs_failed": sum(c for s, c in states.items() if s != "done"),
        "errors_shown": len(errors),
        "steps_timed_out": len(stuck),
        "wall_s": round(driven["ended"] - driven["started"], 1),
        "runs_wall_s": round(max(done_times) - driven["started"], 1) if done_times else None,
        "page_p95_s": round(percentile(loads, 95), 2),
        "server_rss_peak_mb": round(memory.server),
        "workers_rss_peak_mb": round(memory.worker),
        "details": {
            "data": data, "jobs_at_once": jobs_at_once, "resident_workers": resident, "image_size": IMAGE_SIZE,
            "stagger_s": stagger_s,
            "rehearsal_s": round(rehearsal_s, 1), "run_states": states,
            "runs_off_the_lesson": runs_off_the_lesson(Path(env["CXR_RUNS_DIR"])),
            "server_cpu_s": round(memory.cpu_s, 1), "server_busy": round(memory.cpu_s / max(memory.wall_s, 1e-9), 2),
            "page_median_s": round(percentile(loads, 50), 2), "page_max_s": round(max(loads, default=0.0), 2),
            "operator_p95_s": round(percentile([s for _, s in driven["operator_loads"]], 95), 2),
            "outcomes": {v.name: v.outcome for v in visitors},
            "pages": {v.name: [(w, round(s, 2)) for w, s in v.loads] for v in visitors},
            "errors": errors, "timed_out": stuck,
            "warm_up": [(w, round(t, 2)) for w, t in driven["warm_up"]],
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--visitors", type=int, default=30)
    parser.add_argument("--data", choices=("kermany", "practice"), default="kermany")
    parser.add_argument("--jobs", type=int, default=2, help="training jobs at once (the operator's setting)")
    parser.add_argument("--stagger", type=float, default=1.0, help="seconds between two visitors' first clicks")
    parser.add_argument("--no-resident", dest="resident", action="store_false",
                        help="a new training process per job instead of resident workers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (its path is logged)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cxr-classroom-"))
    try:
        result = classroom(args.visitors, args.data, work, args.jobs, args.stagger, args.resident)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"classroom-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "details"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
