"""The `alignloop` command: one CLI, one subcommand per job.

    alignloop init [--demo]                   write ./alignloop.toml (and build the demo model)
    alignloop import FILE --format hh|jsonl   add preference pairs to the store
    alignloop gold FILE --format hh|jsonl     add gold pairs: known answers that measure labellers
    alignloop export pairs|prompts|feedback|snapshot --output PATH
    alignloop user add NAME --role labeller|admin|app
    alignloop exclude --user NAME [--undo]    leave a user's contributions out of every future snapshot
    alignloop serve                           the vLLM engine and the gateway
    alignloop promote VERSION | rollback      hot-swap what the served alias points to
    alignloop versions [--add ADAPTER_DIR]
    alignloop retrain [--method dpo|ppo|kto] [--force]  one cycle: snapshot, train, evaluate, gate, promote
    alignloop gate VERSION                    the gate on a registered candidate: promote, reject or hold
    alignloop rank                            order the labelling queue by what a label would teach
    alignloop scheduler                       retrain nightly / every N labels
    alignloop simulate --labellers N --pairs M
    alignloop compare [--methods dpo,ppo] [--seeds 0,1,2]  DPO vs RLHF measured on the same labelled data
    alignloop status [--json]
    alignloop up                              the whole system on the configured model

Every command reads ./alignloop.toml (or --config FILE); `--set section.key=value` overrides a
field. Heavy imports live inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from loop import config as configuration
from loop.config import Config, ConfigError


def _store(cfg: Config):
    from store import Store

    return Store(cfg.db_path)


def _gateway(cfg: Config):
    from loop.client import GatewayClient

    return GatewayClient.for_config(cfg)


def cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    path = Path(args.config or configuration.CONFIG_FILE)
    _private_dir(cfg.data_dir)
    with _store(cfg) as store:  # first: a store that a running gateway holds fails here, before any file is written
        if path.exists() and not args.force:
            print(f"{path} exists already; keeping it (use --force to overwrite)")
        else:
            path.write_text(configuration.render(cfg))
            print(f"wrote {path}")
        cfg = configuration.load(path, args.set)  # what was written must load
        print(f"store ready at {store.path}")
    if args.demo:
        ensure_demo_model(cfg, rebuild=args.force)
    return 0


def ensure_demo_model(cfg: Config, rebuild: bool = False) -> Path:
    """Build the demo model unless a build of the same config and corpus is there already."""
    from loop.demo.model import build_demo_model, demo_info
    from loop.demo.model import ensure_demo_model as ensure

    out = cfg.demo_model_dir
    if rebuild and out.exists():
        return build_demo_model(out, cfg.demo, progress=True)
    if demo_info(out) is None:
        print(f"building the demo model into {out} (about 2 minutes on 2 CPU cores, once)", flush=True)
    return ensure(out, cfg.demo, progress=True)


def cmd_import(cfg: Config, args: argparse.Namespace) -> int:
    from store.database import StoreLocked
    from store.importer import import_file, import_gold

    try:
        store = _store(cfg)
    except StoreLocked as e:  # there is no import over HTTP: say what to do
        raise StoreLocked(f"{e}\nThe gateway holds the store while it runs, and `alignloop "
                          f"{'gold' if args.gold else 'import'}` writes it directly: stop the gateway (Ctrl-C on "
                          "`alignloop up`), run this again, then start it; the queue hands the new pairs out "
                          "from then on.") from None
    with store:
        report = (import_gold if args.gold else import_file)(store, args.file, args.format)
    print(report.summary())
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"full report: {args.report}")
    return 0


def cmd_export(cfg: Config, args: argparse.Namespace) -> int:
    from loop.evaluation.reliability import snapshot_accuracy
    from store import export

    cutoff = datetime.fromisoformat(args.until) if args.until else None
    with _store(cfg) as store:
        accuracy = snapshot_accuracy(store, cfg.labeling.aggregate)
        if args.kind == "snapshot":
            manifest = export.snapshot(store, args.output, cfg.store.heldout_share, cutoff, accuracy)
        else:
            manifest = export.export(store, args.kind, args.output, args.format, cfg.store.heldout_share, cutoff,
                                     accuracy)
    counts = ", ".join(f"{v} {k}" for k, v in manifest.counts.items())
    print(f"wrote {args.output}: {counts} (cut-off {manifest.cutoff})")
    if manifest.skipped.get("no_majority"):
        print(f"left out {manifest.skipped['no_majority']} labelled pairs with no majority (tie, both bad or split votes)")
    return 0


def cmd_user(cfg: Config, args: argparse.Namespace) -> int:
    client = _gateway(cfg)
    if args.user_command == "list":
        if client.running():
            return _list_users(client.call("GET", "/api/users"))
        with _store(cfg) as store:
            return _list_users(store.user_activity())
    if client.running():  # the gateway owns the store while it runs
        token = client.call("POST", "/api/users", json={"name": args.name, "role": args.role})["token"]
    else:
        with _store(cfg) as store:
            token = store.add_user(args.name, args.role)
    what = "API key" if args.role == "app" else "sign-in token"
    print(f"added {args.role} {args.name!r}; {what} (shown once): {token}")
    return 0


def _list_users(users: list[dict]) -> int:
    print(f"{'name':<16} {'role':<8} {'labels':>6} {'skips':>5} {'feedback':>8}  {'last label':<19}  excluded")
    for u in users:
        print(f"{u['name']:<16} {u['role']:<8} {u['labels']:>6} {u['skips']:>5} {u['feedback']:>8}  "
              f"{_when(u['last_label_at']):<19}  {_when(u['excluded_at'])}")
    return 0


def _when(t) -> str:
    """A time from the API (ISO text) or the store (a datetime), to the second, as one text."""
    return str(t).replace("T", " ")[:19] if t else "-"


def cmd_exclude(cfg: Config, args: argparse.Namespace) -> int:
    client = _gateway(cfg)
    excluded = not args.undo
    if client.running():
        user = client.call("POST", f"/api/users/{args.user}/exclude", json={"excluded": excluded})
    else:
        with _store(cfg) as store:
            user = store.exclude_user(args.user, by="cli", excluded=excluded)
    if excluded:
        print(f"{user['role']} {user['name']!r} excluded: their labels, feedback and traffic are left out of "
              "every snapshot from now on (nothing is deleted; --undo takes them back)")
    else:
        print(f"{user['role']} {user['name']!r} included again")
    return 0


LAST_RUNS = 3  # the runs `status` shows, newest first


def cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    """From the gateway when it runs; else straight from the store."""
    client = _gateway(cfg)
    if client.running():
        status = client.call("GET", "/api/status")
        status["gateway"] = client.url
        runs = client.call("GET", "/api/runs")[:LAST_RUNS]
    else:
        with _store(cfg) as store:
            serving, previous = store.serving(cfg.model.served_name)
            status = {"alias": cfg.model.served_name, "serving": serving, "previous": previous,
                      "gateway": None, "counts": store.counts()}
            runs = store.runs(LAST_RUNS)
    status["last_runs"] = [{k: r.get(k) for k in ("id", "method", "trigger", "status", "reason", "started_at")}
                           for r in runs]
    status.update(config=str(cfg.path) if cfg.path else None, data_dir=str(cfg.data_dir),
                  base_model=str(cfg.base_model_dir))
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        for key, value in status.items():
            if key == "replicas":
                for r in value:
                    state = "ready" if r["ready"] else f"out ({r['problem']})"
                    print(f"{'replica':>12}: {r['name']} {r['url']} {state}, {r['in_flight']} in flight, "
                          f"{r['answered']} answered, {r['failed']} failed, {r['restarts']} restarts, "
                          f"adapters {r['adapters']}")
            elif key == "last_runs":
                for r in value or [{"id": None}]:
                    print(f"{'run':>12}: " + ("none yet" if r["id"] is None else
                                              f"{r['id']} {r['method']} ({r['trigger']}) {r['status']}"
                                              + (f": {r['reason']}" if r["reason"] else "")))
            elif key in ("serving", "previous") and isinstance(value, int):
                print(f"{key:>12}: {'base' if value == 0 else f'v{value}'}")
            elif key == "counts":
                print(f"{key:>12}: " + ", ".join(f"{n} {table.replace('_', ' ')}" for table, n in value.items()))
            elif key == "config" and value is None:
                print(f"{key:>12}: none (built-in defaults; `alignloop init` writes an alignloop.toml)")
            else:
                print(f"{key:>12}: {_plain(value)}")
    return 0


def _plain(value: Any, nested: bool = False) -> str:
    """A status value in one readable line: a dict as `name value, ...` (unset entries left out; a
    dict within, in parentheses), a list comma-separated."""
    if isinstance(value, dict):
        text = ", ".join(f"{k.replace('_', ' ')} {_plain(v, True)}" for k, v in value.items() if v is not None)
        return f"({text})" if nested else text
    if isinstance(value, list):
        return ", ".join(_plain(v, True) for v in value) or "none"
    return "none" if value is None else str(value)


def _private_dir(path: Path) -> None:
    """The data folder, the owner's alone (0700), whether made now or by an older version."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _ready_to_serve(cfg: Config) -> None:
    """The data folder, and the demo model when no base model is configured."""
    _private_dir(cfg.data_dir)
    if not cfg.model.base:
        ensure_demo_model(cfg)


def cmd_serve(cfg: Config, args: argparse.Namespace) -> int:
    from loop.serving.server import serve

    _ready_to_serve(cfg)
    return serve(cfg)


def cmd_promote(cfg: Config, args: argparse.Namespace) -> int:
    from loop.client import version_name

    result = _gateway(cfg).call("POST", "/api/promote", json={"version": args.version, "reason": args.reason})
    if result["changed"]:
        print(f"serving {version_name(result['serving'])} (was {version_name(result['previous'])}); "
              f"took {result['seconds']} s")
    else:
        print(f"{version_name(result['serving'])} is serving already")
    return 0


def cmd_rollback(cfg: Config, args: argparse.Namespace) -> int:
    from loop.client import version_name

    result = _gateway(cfg).call("POST", "/api/rollback")
    print(f"rolled back: serving {version_name(result['serving'])} (was {version_name(result['previous'])}); "
          f"`alignloop rollback` again would serve {version_name(result['previous'])} again")
    return 0


def cmd_versions(cfg: Config, args: argparse.Namespace) -> int:
    client = _gateway(cfg)
    if args.adapter:
        v = client.call("POST", "/api/versions", json={"adapter_path": str(Path(args.adapter).resolve()),
                                                       "method": args.method})
        print(f"registered {v['name']} (candidate) from {v['adapter_path']}")
        return 0
    versions = client.call("GET", "/api/versions")
    names = {v["id"]: v["name"] for v in versions}
    print(f"{'name':>6}  {'status':<9} {'method':<6} {'parent':<6} {'created':<19}  adapter")
    for v in versions:
        parent = names.get(v["parent_id"], "-" if v["parent_id"] is None else f"#{v['parent_id']}")
        print(f"{v['name']:>6}  {v['status']:<9} {v['method']:<6} {parent:<6} {(v['created_at'] or '')[:19]:<19}  "
              f"{v['adapter_path'] or '-'}")
    return 0


def cmd_up(cfg: Config, args: argparse.Namespace) -> int:
    from loop.up import up

    _ready_to_serve(cfg)
    return up(cfg, args.set)


def cmd_retrain(cfg: Config, args: argparse.Namespace) -> int:
    from loop.retrain import run_cycle
    from loop.up import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()  # a supervisor's stop ends the run as Ctrl-C does, recorded
    result = run_cycle(cfg, method=args.method, trigger=args.trigger, force=args.force)
    return 0 if result["status"] in ("promoted", "rejected", "held", "skipped", "busy") else 1


def cmd_gate(cfg: Config, args: argparse.Namespace) -> int:
    from loop.retrain import gate_version

    gate_version(cfg, args.version)
    return 0


def cmd_rank(cfg: Config, args: argparse.Namespace) -> int:
    from loop.queue_ranker import rank

    done = rank(cfg, _gateway(cfg))
    if done.get("reason"):
        print(f"not ranked: {done['reason']}")
    return 0


def cmd_scheduler(cfg: Config, args: argparse.Namespace) -> int:
    from loop.scheduler import Scheduler

    Scheduler(cfg).run_forever()
    return 0


def cmd_compare(cfg: Config, args: argparse.Namespace) -> int:
    from loop.evaluation.compare import compare

    _ready_to_serve(cfg)
    out = Path(args.out) if args.out else cfg.data_dir / "compare" / datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.snapshot:
        snapshot = Path(args.snapshot)
    elif (client := _gateway(cfg)).running():  # the gateway owns the store while it runs
        snapshot = Path(client.call("POST", "/api/snapshot")["dir"])
    else:
        from loop.evaluation.reliability import snapshot_accuracy
        from store import export

        snapshot = out / "snapshot"
        with _store(cfg) as store:
            export.snapshot(store, snapshot, cfg.store.heldout_share,
                            accuracy=snapshot_accuracy(store, cfg.labeling.aggregate))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in configuration.METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(configuration.METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    result = compare(cfg, snapshot, out, methods, seeds, samples=args.samples)
    print(result["table"])
    print(f"report: {result['report']}\nplot: {result['plot']}\nevery number: {out / 'trials.jsonl'}")
    return 0 if all(s["seeds"] for s in result["summary"]) else 1


def cmd_simulate(cfg: Config, args: argparse.Namespace) -> int:
    from loop.demo.simulate import simulate

    if args.nights and (args.flip or args.requests is not None):
        raise ConfigError("--nights takes --pairs (new pairs a night), --labellers, --labels and --seed; "
                          "not --flip or --requests")
    if args.labels is not None and (not args.nights or args.labels < 0):
        raise ConfigError("--labels (a nightly label budget, 0 or more) goes with --nights")
    client = _gateway(cfg)
    if args.nights:
        return _simulate_nights(cfg, client, args)
    result = simulate(client, cfg.model.served_name, args.labellers, args.pairs, flip=args.flip, seed=args.seed,
                      feedback_share=args.feedback_share, requests=args.requests)
    print(json.dumps(result["counts"]))
    return 0


def _simulate_nights(cfg: Config, client, args: argparse.Namespace) -> int:
    from datetime import datetime

    from loop.demo import continual

    out = cfg.data_dir / "simulate" / f"nights-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = continual.nights(cfg, client, args.nights, args.pairs, args.labellers, args.seed, labels=args.labels)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(continual.table(records))
    print(f"every number: {out}")
    return 0


RETRAIN_HELP = """One retrain cycle now, through the running gateway (`alignloop up` or `serve`):
  1. snapshot the store (labels, pairs, prompts, feedback) to Parquet, held-out pairs apart;
  2. in a child process, train the candidate (train.method, or --method) with LoRA on the base
     model, and refresh the gate's reward model on every label so far;
  3. register the candidate, load it on the engine, and gate it against what serves (judge, win rate
     with its interval, KL budget: the [gate] section);
  4. promote it (hot-swap, no failed request), reject it, or hold it as a candidate.
Every step is logged here and kept in the store (`alignloop status`, the admin page).
Exit status: 0 when the run ended in a decision (promoted, rejected, held) or was skipped (no new
labels; a run already going), 1 when it failed (what serves is untouched)."""


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)  # accepted before or after the command
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="config file (default: ./alignloop.toml if it exists, else defaults)")
    common.add_argument("--set", dest="set_after", action="append", default=argparse.SUPPRESS, metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set gateway.port=8001 (repeatable)")
    p = argparse.ArgumentParser(prog="alignloop", description="An online, continual alignment loop.")
    p.add_argument("--config", help="config file (default: ./alignloop.toml if it exists, else defaults)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set gateway.port=8001 (repeatable)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser

    def add(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A command with the common options; `COMMAND --help` opens with its help, or with the
        `description` given, laid out as written."""
        if "description" in kwargs:
            kwargs["formatter_class"] = argparse.RawDescriptionHelpFormatter
        return add_parser(name, help=help, parents=[common], **{"description": help, **kwargs})

    sub.add_parser = add  # type: ignore[method-assign]

    s = sub.add_parser("init", help="write ./alignloop.toml with every field and its help")
    s.add_argument("--demo", action="store_true", help="also build the demo base model")
    s.add_argument("--force", action="store_true", help="overwrite the config file and rebuild the demo model")
    s.set_defaults(run=cmd_init)

    s = sub.add_parser("import", help="import preference pairs (HH-RLHF or JSONL, may be gzipped)")
    s.add_argument("file")
    s.add_argument("--format", required=True, choices=["hh", "jsonl"])
    s.add_argument("--report", help="write the full report (every skipped line) as JSON here")
    s.set_defaults(run=cmd_import, gold=False)

    s = sub.add_parser("gold", help="add gold pairs (chosen is the known better reply): handed to labellers "
                                    "unmarked to measure them, never trained on")
    s.add_argument("file")
    s.add_argument("--format", required=True, choices=["hh", "jsonl"])
    s.add_argument("--report", help="write the full report (every skipped or refused line) as JSON here")
    s.set_defaults(run=cmd_import, gold=True)

    s = sub.add_parser("export", help="export pairs, prompts or feedback (or a whole snapshot) for training")
    s.add_argument("kind", choices=["pairs", "prompts", "feedback", "snapshot"])
    s.add_argument("--output", required=True, help="file to write (a folder for snapshot)")
    s.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="ignored for snapshot (Parquet)")
    s.add_argument("--until", help="cut-off time (ISO 8601); default now")
    s.set_defaults(run=cmd_export)

    s = sub.add_parser("user", help="manage labellers, admins and apps' API keys")
    user_sub = s.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    a = user_sub.add_parser("add", help="add a user and print their sign-in token")
    a.add_argument("name")
    a.add_argument("--role", required=True, choices=["labeller", "admin", "app"],
                   help="app: an application's API key, for /v1 only")
    a.set_defaults(run=cmd_user)
    a = user_sub.add_parser("list", help="every user, with the labels, skips and feedback each gave")
    a.set_defaults(run=cmd_user)

    s = sub.add_parser("exclude", help="leave a user's labels, feedback and traffic out of every future snapshot")
    s.add_argument("--user", required=True, help="the user's name")
    s.add_argument("--undo", action="store_true", help="take their contributions back in")
    s.set_defaults(run=cmd_exclude)

    s = sub.add_parser("status", help="what the store holds and what serves")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_status)

    s = sub.add_parser("serve", help="start the vLLM engine and the gateway (Ctrl-C stops both)")
    s.set_defaults(run=cmd_serve)

    s = sub.add_parser("promote", help="make a version serve under the alias (hot-swap)")
    s.add_argument("version", help="version name (v3) or id; 'base' for the base model")
    s.add_argument("--reason")
    s.set_defaults(run=cmd_promote)

    s = sub.add_parser("rollback", help="serve the previous version again")
    s.set_defaults(run=cmd_rollback)

    s = sub.add_parser("versions", help="list model versions, or register an adapter as a candidate")
    s.add_argument("--add", dest="adapter", metavar="ADAPTER_DIR", help="register this PEFT adapter directory")
    s.add_argument("--method", default="manual", help="how the adapter was made (with --add)")
    s.set_defaults(run=cmd_versions)

    s = sub.add_parser("retrain", help="one retrain cycle now: snapshot, train, evaluate, gate, promote",
                       description=RETRAIN_HELP)
    s.add_argument("--method", choices=configuration.METHODS, help="default: train.method")
    s.add_argument("--force", action="store_true", help="train even if no new labels came since the last promotion")
    s.add_argument("--trigger", default="manual", help=argparse.SUPPRESS)
    s.set_defaults(run=cmd_retrain)

    s = sub.add_parser("gate", help="judge a registered candidate against what serves; promote, reject or hold it")
    s.add_argument("version", help="the candidate's name, e.g. v3")
    s.set_defaults(run=cmd_gate)

    s = sub.add_parser("rank", help="labeling.order = 'active': score the waiting pairs with the gate's newest reward "
                                    "model and hand out first those a label would teach most (a retrain does it too)")
    s.set_defaults(run=cmd_rank)

    s = sub.add_parser("scheduler", help="retrain by the [schedule] rules until stopped")
    s.set_defaults(run=cmd_scheduler)

    s = sub.add_parser("simulate", help="scripted users and labellers (demo judge) through the HTTP API")
    s.add_argument("--labellers", type=int, default=4)
    s.add_argument("--pairs", type=int, default=200, help="send traffic until the store holds this many pairs "
                                                          "(with --nights: this many new pairs each night)")
    s.add_argument("--nights", type=int, default=0,
                   help="the continual run: each night traffic, labels, the nightly retrain and the demo rule's grades "
                        "of what serves (a table, and every number in DATA_DIR/simulate/)")
    s.add_argument("--flip", action="store_true", help="label against the judge (to see the gate reject)")
    s.add_argument("--feedback-share", type=float, default=0.5,
                   help="share of answers the simulated users rate with a thumb (what KTO learns from)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--requests", type=int, default=None,
                   help="stop the traffic after this many requests, however many pairs there are")
    s.add_argument("--labels", type=int, default=None,
                   help="with --nights: at most this many labels a night (default: the queue labelled empty)")
    s.set_defaults(run=cmd_simulate)

    s = sub.add_parser("compare", help="DPO vs RLHF (reward model + PPO) on the same labelled data: memory, time, "
                                       "knobs, win rate and its spread over seeds")
    s.add_argument("--methods", default="dpo,ppo", help="comma-separated, from dpo, ppo, kto")
    s.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    s.add_argument("--samples", type=int, default=2, help="answers per held-out prompt when judging")
    s.add_argument("--snapshot", help="a snapshot directory (default: a fresh snapshot of the store)")
    s.add_argument("--out", help="report directory (default: DATA_DIR/compare/TIMESTAMP)")
    s.set_defaults(run=cmd_compare)

    s = sub.add_parser("up", help="start the whole system on the configured (default: demo) model")
    s.set_defaults(run=cmd_up)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.set += getattr(args, "set_after", [])
    os.umask(0o077)  # the store, exports, tokens and logs are the owner's alone, from the start
    try:
        init = args.command == "init"
        cfg = configuration.load(args.config or (configuration.CONFIG_FILE if init else None), args.set, missing_ok=init)
        code = args.run(cfg, args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:  # `alignloop status | head`: the reader has had enough; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        return 141  # as a tool ended by SIGPIPE
    except (ConfigError, ValueError, OSError) as e:
        print(f"alignloop: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # StoreError and the like: a clear sentence, no traceback
        print(f"alignloop: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("alignloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
