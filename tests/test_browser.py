"""The labelling app in a real headless Chromium: sign in, label with the keyboard only (undo too),
see that keys typed into the rationale field label nothing, open the dashboard's plots, reload and
stay signed in, and find every label in the store. Saves label.png and dashboard.png in the test's temporary folder, or in
the folder ALIGNLOOP_SCREENSHOTS names (`ALIGNLOOP_SCREENSHOTS=docs/screenshots` refreshes the
README's pictures).

Needs Debian's chromium (`ops/setup.sh test` installs it) and the playwright package; never run
`playwright install`. Without chromium this test skips, or fails when CI is set.
"""

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from store.database import NewPair
from tests.serving import free_port
from tests.ui_gateway import running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]

SAMPLES = [
    NewPair([{"role": "user", "content": "What is the capital of Australia?"}],
            "Canberra. Many people guess Sydney, the largest city, but Canberra was chosen as a compromise "
            "between Sydney and Melbourne and has been the capital since 1913.",
            "Sydney is the capital of Australia."),
    NewPair([{"role": "user", "content": "How do I reverse a list in Python?"},
             {"role": "assistant", "content": "Do you want a new list, or to reverse it in place?"},
             {"role": "user", "content": "A new list, please, and keep the original."}],
            "Use slicing, which copies:\n\n```python\nitems = [1, 2, 3]\nbackwards = items[::-1]  # [3, 2, 1]\n```\n\n"
            "`items` is unchanged. `list(reversed(items))` does the same.",
            "Call `items.reverse()`:\n\n```python\nitems.reverse()\n```\n\nIt reverses the list."),
]


def chromium_or_skip() -> None:
    if CHROMIUM.exists():
        return
    why = f"{CHROMIUM} is missing: run `ops/setup.sh test` (or apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def small_png(png: bytes, path: Path) -> None:
    """Save a screenshot as a 256-colour PNG: a fraction of the size, still crisp for UI."""
    from PIL import Image

    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(path, optimize=True)


def wait_for(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A gateway with no engine and `streamlit run labeling_ui/app.py` in front of it."""
    chromium_or_skip()
    root = tmp_path_factory.mktemp("browser")
    with running(root / "gateway", pairs=20, samples=SAMPLES) as gateway:
        port = free_port()
        log = (root / "streamlit.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "labeling_ui" / "app.py"),
             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            env=os.environ | {"ALIGNLOOP_GATEWAY_URL": gateway.url}, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, (root / "streamlit.log").read_text()
            try:
                return httpx.get(f"{url}/_stcore/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(healthy, "streamlit to start", 60)
            yield gateway, url
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def test_label_with_the_keyboard_then_see_the_dashboard(stack, tmp_path):
    shots = Path(os.environ.get("ALIGNLOOP_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    gateway, url = stack
    token = gateway.add_user("dana")
    done = lambda: len(gateway.labels("dana"))  # noqa: E731
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        page.goto(url)
        page.get_by_label("Token", exact=True).fill(token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="A is better")).to_be_visible()
        keys = "Keys: 1 A better · 2 B better · 3 tie · 4 both bad · 5 skip · U undo"
        expect(page.get_by_text(keys)).to_be_visible()
        expect(page.get_by_text("A new list, please, and keep the original.")).to_be_visible()
        expect(page.locator("code").filter(has_text="backwards = items[::-1]").first).to_be_visible()
        small_png(page.screenshot(), shots / "label.png")

        def press(key: str, expected: int, today: int | None = None) -> None:
            """Press a key as a person does: once the pair on screen is fully drawn. `expected`: rows in
            the store after it; `today`: what the page counts as labelled today (skips are no labels)."""
            page.keyboard.press(key)
            wait_for(lambda: done() == expected, f"label {expected} after pressing {key!r}")
            shown = httpx.get(f"{gateway.url}/api/label/next", headers={"Authorization": f"Bearer {token}"})
            expect(page.locator(f".st-key-label-first-{shown.json()['pair']['pair_id']}")).to_be_visible()
            expect(page.locator("[data-test-script-state='notRunning']")).to_have_count(1)
            expect(page.get_by_text(re.compile(rf"^{expected if today is None else today} labelled today"))).to_be_visible()

        for n, key in enumerate("1234", start=1):  # A better, B better, tie, both bad
            press(key, n)
        undone = gateway.labels("dana")[-1][0]
        press("u", 3)  # undo "both bad": that pair comes back
        press("5", 4, today=3)  # and is skipped
        assert gateway.labels("dana")[-1][0] == undone

        field = page.get_by_placeholder(re.compile("^Rationale"))
        field.click()
        field.type("terse 1")  # keys typed into the field are text, not labels
        time.sleep(1)
        assert done() == 4
        page.keyboard.press("Tab")
        time.sleep(0.5)
        press("2", 5, today=4)

        labels = gateway.labels("dana")
        assert [c for _, c, _, _ in labels][2:4] == ["tie", "skip"]  # "both bad" was undone
        # keys 1 and 2 pick the reply shown first / second; the store keeps a or b, by the pair's order
        from store.labelling import to_stored_choice

        uid = dict(gateway.gw.store._all("SELECT id, uid FROM pairs"))
        pressed = [(labels[0], "first"), (labels[1], "second"), (labels[4], "second")]
        assert [label[1] for label, _ in pressed] == [to_stored_choice(key, uid[label[0]]) for label, key in pressed]
        assert labels[4][2] == "terse 1" and all(s is not None for *_, s in labels)

        others_label(gateway)
        page.get_by_role("link", name="Dashboard").click()
        charts = page.locator("[data-testid='stVegaLiteChart']")
        expect(charts.nth(4)).to_be_visible()  # per day, per labeller, seconds, run win rates, run curve
        wait_for(lambda: page.locator("[data-testid='stVegaLiteChart'] canvas, "
                                      "[data-testid='stVegaLiteChart'] svg").count() >= 5, "the plots to draw")
        expect(page.get_by_text("the gate needs 55%")).to_be_visible()
        page.wait_for_timeout(500)  # let the charts finish their transition
        page.set_viewport_size({"width": 1280, "height": 1300})  # Streamlit scrolls inside its own container
        page.wait_for_timeout(500)
        small_png(page.screenshot(), shots / "dashboard.png")
        page.reload()  # a reload, on another page than the first: still signed in, on the same page
        expect(page.get_by_text("Signed in as dana")).to_be_visible()
        expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
        expect(page.get_by_label("Token", exact=True)).to_have_count(0)
        assert "session=" in page.url and token not in page.url
        elsewhere = browser.new_context().new_page()  # the same address in another browser: nobody
        elsewhere.goto(page.url)
        expect(elsewhere.get_by_label("Token", exact=True)).to_be_visible()
        expect(elsewhere.get_by_text("Signed in as dana")).to_have_count(0)
        browser.close()


def others_label(gateway) -> None:
    """Two more labellers through the API, and a retrain run reporting its curve, so every plot has data."""
    admin = {"Authorization": f"Bearer {gateway.admin_token}"}
    for name, n, seconds in (("ben", 6, 9.0), ("chloe", 4, 14.0)):
        auth = {"Authorization": f"Bearer {gateway.add_user(name)}"}
        for i in range(n):
            pair = httpx.get(f"{gateway.url}/api/label/next", headers=auth).json()["pair"]
            choice = "first" if pair["first"].startswith(("It is", "Canberra", "Use")) else "second"
            httpx.post(f"{gateway.url}/api/label", headers=auth, json={
                "pair_id": pair["pair_id"], "choice": choice, "seconds": seconds + i}).raise_for_status()
    run = httpx.post(f"{gateway.url}/api/runs", headers=admin, json={"method": "dpo", "trigger": "test"}).json()
    curve = [{"step": s, "name": name, "value": value} for s in range(0, 60, 5)
             for name, value in (("loss", 0.69 * 0.97 ** s), ("rewards/margins", 0.02 * s))]
    httpx.post(f"{gateway.url}/api/runs/{run['id']}/heartbeat", headers=admin,
               json={"metrics": curve}).raise_for_status()
    httpx.post(f"{gateway.url}/api/runs/{run['id']}/finish", headers=admin, json={
        "status": "rejected", "reason": "candidate won 48% of held-out pairs; the gate needs 55%",
        "metrics": {"win_rate": 0.48, "kl": 0.031, "train_pairs": 9}}).raise_for_status()
