"""`alignloop simulate`: traffic from scripted users and labels from scripted labellers, all through
the same HTTP API people use (the OpenAI endpoint, sign-in tokens, the labelling queue).

Users ask the demo domain's training prompts; the gateway makes pairs from that traffic in the
background. A share of users (`feedback_share`) rate the answer they got with a thumb, up when the
demo judge calls it good, else down (`POST /v1/feedback`: what KTO trains on). Labellers take pairs
from the queue and choose with the demo judge's rule (or against it with `flip`, to see the gate
reject what bad labels train; thumbs stay honest).
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from loop.client import GatewayClient, GatewayError
from loop.demo import corpus as demo_corpus
from loop.demo import judge

JUDGE_TO_CHOICE = {"a": "first", "b": "second", "tie": "tie"}
FLIPPED = {"a": "second", "b": "first", "tie": "tie"}
USERS = 8  # simulated users sending traffic at once, each an app with its own API key


def traffic(client: GatewayClient, alias: str, pairs: int, seed: int = 0, burst: int = 16,
            max_tokens: int = 64, timeout_s: float = 900, feedback_share: float = 0.5, requests: int | None = None,
            log=print) -> int:
    """Send demo prompts in bursts until the store holds `pairs` pairs (or `requests` were sent);
    returns requests sent.

    After a share `feedback_share` of the answers, the user sends a thumb on it (up when the demo
    judge calls it good, else down), with the response id the gateway returned. The users are
    `USERS` apps with API keys of their own (anonymous callers may not give feedback)."""
    if not 0.0 <= feedback_share <= 1.0:
        raise ValueError(f"feedback_share must be in [0, 1], got {feedback_share}")
    rng = random.Random(seed)
    rates = random.Random(f"feedback:{seed}")  # its own stream: the prompts drawn stay as they were
    prompts = demo_corpus.prompts("train")
    keys = [{"Authorization": f"Bearer {client.user_token(f'sim-user-{i}', 'app')}"} for i in range(USERS)]
    sent, thumbs, deadline = 0, 0, time.monotonic() + timeout_s
    with httpx.Client(base_url=client.url, timeout=120) as http:
        while time.monotonic() < deadline:
            status = client.call("GET", "/api/status")
            if status["counts"]["pairs"] >= pairs or (requests is not None and sent >= requests):
                break
            if status["pair_queue"] > burst:  # let the background pair maker catch up
                time.sleep(0.5)
                continue

            def ask(user: int, rate: bool) -> bool:
                sampling_seed, prompt = rng.randrange(2**31), rng.choice(prompts)
                body = {"model": alias, "max_tokens": max_tokens, "temperature": 1.0, "seed": sampling_seed,
                        "messages": [{"role": "user", "content": prompt}]}
                for attempt in range(5):  # as OpenAI's clients do: a 503 or a dropped connection is retried
                    try:
                        r = http.post("/v1/chat/completions", json=body, headers=keys[user])
                    except httpx.TransportError as e:
                        if attempt == 4:
                            raise
                        log(f"simulate: {type(e).__name__} ({e}); retrying")
                        time.sleep(1)
                        continue
                    if r.status_code not in (429, 503):
                        break
                    log(f"simulate: {r.status_code} ({r.json()['error']['message']}); retrying")
                    time.sleep(min(float(r.headers.get("Retry-After", 1)), 10))
                r.raise_for_status()
                if not rate:
                    return False
                answer = r.json()
                choice = answer["choices"][0]
                text = choice["message"].get("content") or ""
                thumb = "up" if judge.is_good(prompt, text) else "down"
                f = http.post("/v1/feedback", json={"id": answer["id"], "choice": choice["index"], "thumbs": thumb},
                              headers=keys[user])
                f.raise_for_status()
                return True

            rate = [rates.random() < feedback_share for _ in range(burst)]
            with ThreadPoolExecutor(USERS) as pool:
                thumbs += sum(pool.map(ask, [i % USERS for i in range(burst)], rate))
            sent += burst
        counts = settled(client, min(deadline, time.monotonic() + 120))["counts"]
        log(f"simulate: {sent} requests, {thumbs} thumbs sent; {counts['pairs']} pairs, "
            f"{counts.get('feedback', 0)} feedback in the store")
    return sent


def settled(client: GatewayClient, deadline: float) -> dict:
    """The gateway's status once the background pair maker has made every second answer it was
    offered and the log writer has stored them (two readings in a row; at the deadline, as it is): what
    the traffic sent is then all in the store, and a ranking or a label run that follows sees it."""
    quiet = 0
    while True:
        status = client.call("GET", "/api/status")
        quiet = quiet + 1 if status["pair_queue"] == 0 and status["log_queue"] == 0 else 0
        if quiet == 2 or time.monotonic() >= deadline:
            return status
        time.sleep(0.1)


def labeller(url: str, token: str, flip: bool, stop: threading.Event, limit: int) -> int:
    """Label until the queue is empty (or `limit` labels); returns labels given."""
    choose = FLIPPED if flip else JUDGE_TO_CHOICE
    given = 0
    http = GatewayClient(url, token, timeout=60)
    try:
        pair = http.call("GET", "/api/label/next")["pair"]
        while pair is not None and given < limit and not stop.is_set():
            prompt = pair["messages"][-1]["content"]
            choice = choose[judge.prefer(prompt, pair["first"], pair["second"])]
            try:
                answer = http.call("POST", "/api/label", json={"pair_id": pair["pair_id"], "choice": choice,
                                                               "seconds": 0.0})
            except GatewayError as e:
                if e.status != 409:
                    raise
                pair = http.call("GET", "/api/label/next")["pair"]  # taken meanwhile: ask for another
                continue
            given += 1
            pair = answer["pair"]
    finally:
        http.close()
    return given


def label(client: GatewayClient, labellers: int, flip: bool = False, limit: int = 10**9, log=print) -> int:
    """Create scripted labellers (or reuse them) and label the queue empty, or `limit` labels in all;
    returns labels given."""
    if labellers < 1:
        return 0
    tokens = []
    for i in range(labellers):
        name = f"sim-labeller-{i}"
        tokens.append(client.user_token(name, "labeller"))  # a fresh token if it exists from an earlier run
    stop = threading.Event()
    with ThreadPoolExecutor(labellers) as pool:
        shares = [limit // labellers + (i < limit % labellers) for i in range(labellers)]  # `limit` in all
        given = sum(pool.map(lambda t, n: labeller(client.url, t, flip, stop, n), tokens, shares))
    log(f"simulate: {labellers} labellers gave {given} labels" + (" (flipped)" if flip else ""))
    return given


def simulate(client: GatewayClient, alias: str, labellers: int, pairs: int, flip: bool = False,
             seed: int = 0, feedback_share: float = 0.5, requests: int | None = None, log=print) -> dict[str, Any]:
    sent = traffic(client, alias, pairs, seed=seed, feedback_share=feedback_share, requests=requests, log=log)
    given = label(client, labellers, flip=flip, log=log)
    return {"requests": sent, "labels": given, "counts": client.call("GET", "/api/status")["counts"]}
