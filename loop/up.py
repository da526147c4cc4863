"""`alignloop up`: the whole system on the configured (by default, the demo) model.

Starts `alignloop serve` (engine + gateway) and the Streamlit labelling app as child processes,
runs the scheduler in this process, prints the URLs and sign-in tokens, and on Ctrl-C (or SIGTERM,
or a child dying) stops everything.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from loop.client import GatewayClient
from loop.config import Config
from loop.training import memory

APP = Path(__file__).resolve().parents[1] / "labeling_ui" / "app.py"
DEMO_TOKENS = "demo-tokens.json"  # in the data folder, mode 600: the tokens `up` printed last time
DEMO_USERS = (("demo-admin", "admin"), ("demo-labeller", "labeller"))


def demo_tokens(client: GatewayClient, path: Path) -> tuple[str, str]:
    """The demo admin's and labeller's sign-in tokens: those `up` printed last time while they still
    work (a restart signs nobody out), else new ones, kept in `path` for the next start."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    tokens = {}
    for name, role in DEMO_USERS:
        token = kept.get(name) if isinstance(kept, dict) else None
        works = isinstance(token, str) and client.signs_in(token, name)
        tokens[name] = token if works else client.user_token(name, role)
    if tokens != kept:
        path.touch(mode=0o600)
        os.chmod(path, 0o600)
        path.write_text(json.dumps(tokens) + "\n")
    return tokens["demo-admin"], tokens["demo-labeller"]


def _cli(cfg: Config, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "loop.cli"]
    if cfg.path:
        cmd += ["--config", str(cfg.path)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def sigterm_as_ctrl_c() -> None:
    """SIGTERM (a supervisor's stop, `timeout`, `kill`) raises KeyboardInterrupt in the main thread,
    as Ctrl-C does, so the same clean-up runs for both."""
    signal.signal(signal.SIGTERM, _interrupt)


def _listening(proc: subprocess.Popen, port: int, timeout_s: float) -> bool:
    """Wait until something accepts connections on the loopback `port` (False: `proc` exited, or
    `timeout_s` passed), so the URL printed next opens at once."""
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.2)
    return False


def up(cfg: Config, overrides: list[str]) -> int:
    logs = cfg.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    sigterm_as_ctrl_c()
    scheduler = None
    if cfg.schedule.enabled:  # it will train beside the engine: refuse now what cannot fit, not at night
        try:
            memory.preflight(cfg, cfg.schedule.methods() or [cfg.train.method])
        except memory.DoesNotFit as e:
            print(f"alignloop up: {e}", file=sys.stderr)
            return 1
    try:
        procs.append(subprocess.Popen(_cli(cfg, overrides) + ["serve"]))
        client = GatewayClient.for_config(cfg)
        deadline = time.monotonic() + cfg.engine.startup_timeout_s + 60
        while not client.ready():
            if procs[0].poll() is not None:
                print("alignloop up: the gateway exited; see the messages above", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("alignloop up: the engine did not become ready in time; see "
                      f"{logs / 'engine.log'}", file=sys.stderr)
                return 1
            time.sleep(1)
        client = GatewayClient.for_config(cfg)  # again: the admin token exists only now that the gateway is up
        app_url = None
        if APP.exists():
            app_log = (logs / "labeling_ui.log").open("ab")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
                 "--server.address", "127.0.0.1", "--server.port", str(cfg.labeling.app_port),
                 "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                stdout=app_log, stderr=subprocess.STDOUT, env={**os.environ, "ALIGNLOOP_GATEWAY_URL": client.url}))
            app_url = f"http://127.0.0.1:{cfg.labeling.app_port}"
            if not _listening(procs[-1], cfg.labeling.app_port, 60):
                app_url += f" (not answering yet; see {logs / 'labeling_ui.log'})"
        admin, labeller = demo_tokens(client, cfg.data_dir / DEMO_TOKENS)
        if cfg.schedule.enabled:
            from loop.scheduler import Scheduler

            scheduler = Scheduler(cfg)
            scheduler.start()
        print(f"""
alignloop is up.
  model API      {client.url}/v1   (model "{cfg.model.served_name}"; try the README's curl line)
  labelling app  {app_url or "not built yet"}
  sign in        admin token    {admin}
                 labeller token {labeller}
  data           {cfg.data_dir}
Ctrl-C stops everything.
""", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        print("alignloop up: a component exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C (or SIGTERM) must not cut the stop short and leave a child behind: it is
        # bounded anyway (the scheduler stops at once; each child has 30 s, then SIGKILL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if scheduler:
            scheduler.stop()
        _stop(procs)
        print(f"alignloop up: stopped, and all it started; the data stays in {cfg.data_dir}",
              flush=True)

