"""The README's screenshots, from a real run of the whole system, as a user runs it.

In a temporary folder: `alignloop init`, `alignloop up` on free loopback ports, `alignloop simulate
--labellers 3 --pairs 200` (scripted users and labellers through the HTTP API), `alignloop retrain`
(a real DPO run: train, evaluate, gate), a few more chats so the queue holds a fresh pair; then the
labelling app in headless Chromium: the label page as the labeller `up` printed, the dashboard as
its admin. Everything is stopped at the end, on error too.

Run:   .venv/bin/python ops/screenshots.py [--out docs/screenshots] [--base MODEL_DIR] [--keep]

Takes about 6 minutes on 2 CPU cores: 4 building the demo model (skipped when --base names a built
one; by default ./alignloop-data/models/demo if there is one), 1 simulating, half a minute retraining,
seconds for the screenshots. Needs Debian's chromium and playwright (`ops/setup.sh test`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.serving import free_port
from tests.test_browser import small_png, wait_for

ALIGNLOOP = str(ROOT / ".venv" / "bin" / "alignloop")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START = time.monotonic()


def step(what: str) -> None:
    print(f"[{time.monotonic() - START:4.0f} s] {what}", flush=True)


def start_up(tmp: Path, alignloop) -> tuple[subprocess.Popen, dict[str, str]]:
    """`alignloop up` in its own process group; returns it and what it printed (URLs, tokens)."""
    log = tmp / "up.log"
    proc = subprocess.Popen([*alignloop, "up"], cwd=tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def printed() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise RuntimeError(f"alignloop up exited with {proc.returncode}; see {log}")
        text = log.read_text(errors="replace")
        if "alignloop is up." not in text:
            return None
        pick = lambda pattern: re.search(pattern, text).group(1)
        return {"app": pick(r"labelling app\s+(\S+)"), "api": pick(r"model API\s+(\S+)/v1"),
                "admin": pick(r"admin token\s+(\S+)"), "labeller": pick(r"labeller token\s+(\S+)")}

    return proc, wait_for(printed, "alignloop up (it builds the demo model the first time)", 1200)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `up`'s process group (it stops its children), then wait; SIGKILL if it hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def fresh_pair(api: str, labeller: str, model: str = "alignloop") -> None:
    """A few chats as a user; wait until the labeller's queue holds a pair (made in the background)."""
    with httpx.Client(base_url=api, timeout=120) as http:
        for prompt in ("How often should I water basil?", "My bread dough will not rise. What went wrong?"):
            http.post("/v1/chat/completions", json={"model": model, "max_tokens": 64, "messages": [
                {"role": "user", "content": prompt}]}).raise_for_status()
        auth = {"Authorization": f"Bearer {labeller}"}
        wait_for(lambda: http.get("/api/label/next", headers=auth).json()["pair"], "a pair to label", 120)


def screenshots(app: str, labeller: str, admin: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)

        def signed_in(token: str):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(app)
            page.get_by_label("Token", exact=True).fill(token)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("button", name="A is better")).to_be_visible()
            page.wait_for_timeout(1000)  # markdown and code blocks settle
            return page

        small_png(signed_in(labeller).screenshot(), out / "label.png")
        page = signed_in(admin)
        page.get_by_role("link", name="Dashboard").click()
        charts = "[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg"
        wait_for(lambda: page.locator(charts).count() >= 5, "the plots to draw", 60)  # ... and the run's curve
        page.wait_for_timeout(1000)  # let the charts finish their transition
        height = page.evaluate("document.querySelector('[data-testid=stMainBlockContainer]').scrollHeight")
        page.set_viewport_size({"width": 1280, "height": min(1600, height + 40)})  # Streamlit scrolls inside
        page.wait_for_timeout(1000)
        small_png(page.screenshot(), out / "dashboard.png")
        browser.close()


def main() -> int:
    built = ROOT / "alignloop-data" / "models" / "demo"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots", help="folder for the PNGs")
    ap.add_argument("--base", default=str(built) if (built / "alignloop_demo.json").is_file() else "",
                    help="a built demo model directory (default: ./alignloop-data/models/demo if built; else build one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, store) for a look")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="alignloop-screenshots-"))
    settings = [f"gateway.port={free_port()}", f"engine.port={free_port()}", f"labeling.app_port={free_port()}",
                "gateway.pair_share=1.0", "schedule.enabled=false"]  # every chat makes a pair; no nightly run
    if args.base:
        settings.append(f"model.base={Path(args.base).resolve()}")
    alignloop = [ALIGNLOOP, "--config", str(tmp / "alignloop.toml")] + [a for s in settings for a in ("--set", s)]
    run = lambda *command: subprocess.run([*alignloop, *command], cwd=tmp, check=True)
    up, failed = None, True
    try:
        step(f"alignloop init in {tmp}")
        subprocess.run([ALIGNLOOP, "init"], cwd=tmp, check=True)
        step("alignloop up" + ("" if args.base else f" (building the demo model first, ~4 min; see {tmp}/up.log)"))
        up, shown = start_up(tmp, alignloop)
        step("alignloop simulate --labellers 3 --pairs 200")
        run("simulate", "--labellers", "3", "--pairs", "200")
        step("alignloop retrain")
        run("retrain")
        run("status")
        step("a few more chats, for a pair to show on the label page")
        fresh_pair(shown["api"], shown["labeller"])
        step(f"screenshots of {shown['app']} into {args.out}")
        screenshots(shown["app"], shown["labeller"], shown["admin"], args.out)
        step("done")
        failed = False
        return 0
    finally:
        if up is not None:
            step("stopping alignloop up")
            stop(up)
        if args.keep or failed:
            print(f"kept {tmp} (up.log, alignloop-data/logs)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
