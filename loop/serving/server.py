"""`alignloop serve`: the engine, supervised, and the gateway in front of it, in one process tree.

The gateway process owns the store and starts vLLM as its child; Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from loop.config import Config
from loop.serving.engine import Engine
from loop.vllm_server import KEEP_ALIVE_S


def admin_token(store, path: Path) -> str:
    """The local admin's token, kept in `path` (mode 600) so the CLI on this machine can use it."""
    if path.exists():
        token = path.read_text().strip()
        if store.user_by_token(token):
            return token
    names = {u["name"] for u in store.users()}
    token = store.new_token("admin") if "admin" in names else store.add_user("admin", "admin")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return token


def build(cfg: Config, engines: bool = True):
    """The gateway's app and state. engines=False: no engine at all (a gateway for labelling only)."""
    from loop.serving.app import create_app
    from loop.serving.gateway import Gateway
    from loop.serving.replicas import Replicas
    from loop.serving.router import Router
    from loop.serving.versions import Versions
    from store import Store

    store = Store(cfg.db_path)
    admin_token(store, cfg.admin_token_path)
    router = Router(cfg.model.served_name, base_name="base")
    replicas = Replicas.from_config(cfg, "base") if engines else Replicas([])
    versions = Versions(store, router, replicas)
    for replica in replicas.members:
        replica.on_ready = versions.sync
    gw = Gateway(cfg=cfg, store=store, router=router, versions=versions, replicas=replicas)
    return create_app(gw), gw


def _exit_unless_serving(*_) -> None:
    """SIGTERM outside uvicorn (before it takes the signals, after it gives them back): exit through
    `serve`'s finally, which stops the engines. uvicorn shuts down on SIGTERM and then raises it
    again under the handler it found, inside its event loop: with the default one the process would
    die there, before the engine is stopped and the store closed; with an exit, the exit would cut
    the app's shutdown short if a second signal had hurried it. So there it returns, and
    `uvicorn.run` returns to the same finally."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        sys.exit(0)


def serve(cfg: Config) -> int:
    import uvicorn

    app, gw = build(cfg)
    for replica in gw.replicas.members:
        where = f"log: {replica.log_path}" if isinstance(replica, Engine) else "external"
        print(f"engine replica {replica.name}: {replica.url} ({where})", flush=True)
    print(f"starting the vLLM engine on {cfg.base_model_dir}", flush=True)
    gw.replicas.start()
    url = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    print(f"gateway: {url}/v1 (model '{cfg.model.served_name}'); it answers 503 until the engine is ready", flush=True)
    print(f"admin token: {cfg.admin_token_path}", flush=True)
    signal.signal(signal.SIGTERM, _exit_unless_serving)
    try:
        # keep idle client connections longer than uvicorn's 5 s, so a client that pauses between
        # bursts does not send on a connection the gateway is just closing ("Server disconnected")
        uvicorn.run(app, host=cfg.gateway.host, port=cfg.gateway.port, log_level="warning",
                    timeout_keep_alive=KEEP_ALIVE_S)
    finally:
        # the app's shutdown writes the log queue, but a second Ctrl-C makes uvicorn skip it: the
        # answers already given must reach the store all the same (a second stop is a no-op)
        gw.writer.stop()
        gw.replicas.stop()
        gw.store.close()
        print("alignloop serve: the engines are stopped and the store closed", flush=True)
    return 0
