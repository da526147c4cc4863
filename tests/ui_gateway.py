"""A real gateway with no engine, in a thread, for the labelling app's tests (AppTest and browser)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import uvicorn

from loop import config as configuration
from loop.serving.server import build
from store import Store
from store.database import NewPair
from tests.serving import free_port


@dataclass
class Gateway:
    url: str
    admin_token: str
    gw: Any  # loop.serving.gateway.Gateway: gw.store for checks

    def add_user(self, name: str, role: str = "labeller") -> str:
        r = httpx.post(f"{self.url}/api/users", json={"name": name, "role": role},
                       headers={"Authorization": f"Bearer {self.admin_token}"})
        r.raise_for_status()
        return r.json()["token"]

    def labels(self, name: str) -> list[tuple[int, str, str | None, float | None]]:
        """(pair id, stored choice, rationale, seconds) of one user's labels, in order."""
        return self.gw.store._all("""SELECT l.pair_id, l.choice, l.rationale, l.seconds_spent FROM labels l
                                     JOIN users u ON u.id = l.user_id WHERE u.name = ? ORDER BY l.id""", [name])


@contextmanager
def running(root: Path, pairs: int = 10, samples: list[NewPair] = (), settings: list[str] = ()) -> Iterator[Gateway]:
    """A gateway over a fresh store holding `pairs` simple pairs (reply a, the good one, starts
    "It is"), then `samples`, which are handed out first; `settings` as `--set` takes them."""
    port = free_port()
    cfg = configuration.load(None, [f"data.dir={root}", f"gateway.port={port}", "labeling.overlap=2", *settings])
    with Store(cfg.db_path) as s:
        s.add_labelled_pairs([NewPair([{"role": "user", "content": f"Question {i}: what is **{i} + {i}**?"}],
                                      f"It is `{2 * i}`.", f"Maybe {i}?") for i in range(pairs)],
                             "import:test", "dataset:test")
        if samples:
            s.add_labelled_pairs(list(samples), "import:sample", "dataset:sample")
    app, gw = build(cfg, engines=False)  # no engine: labelling needs none
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", cfg.admin_token_path.read_text().strip(), gw)
    finally:
        server.should_exit = True
        thread.join(30)
