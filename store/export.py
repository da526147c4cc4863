"""Snapshot export: labelled pairs, prompts and feedback as Parquet or JSONL, with a manifest.

Pairs come out in TRL's conversational preference format (`prompt` a list of messages, `chosen`
and `rejected` one assistant message each), so a file loads straight into `datasets` and
`DPOTrainer`. A pair's label is the majority of its votes; a pair whose majority is a tie or
"both bad" (or whose votes split evenly) is left out. Given each labeller's estimated accuracy
(`labeling.aggregate = "reliability"`, the default, estimated by loop.evaluation.reliability), a
pair's label is instead the reliability-weighted vote (`weighted`). Every pair carries a `split`, "train" or
"heldout", from a stable hash of the pair, so the held-out set never changes under a pair.
Every row names who gave it (`labellers` of a pair, the `contributor`: the API key whose traffic
made the prompt, or who sent the feedback); users an admin excluded are left out altogether.
Feedback comes out in TRL's unpaired format (`prompt`, `completion`, `label`) for `KTOTrainer`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from store.database import Store

KINDS = ("pairs", "prompts", "feedback")
FORMATS = ("jsonl", "parquet")


@dataclass
class Manifest:
    cutoff: str
    heldout_share: float
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    content_hash: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    aggregate: str = "majority"  # how a pair's votes became its label: "majority" or "reliability" (weighted)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def majority(votes_a: int, votes_b: int, votes_tie: int, votes_both_bad: int) -> str | None:
    """'a' or 'b' when that reply has strictly more votes than every other choice, else None."""
    top = max(votes_tie, votes_both_bad)
    if votes_a > votes_b and votes_a > top:
        return "a"
    if votes_b > votes_a and votes_b > top:
        return "b"
    return None


def weighted(voters: list[str], choices: list[str], accuracy: dict[str, float]) -> str | None:
    """'a' or 'b' by the votes weighted with each labeller's log-odds of being right (so an always-wrong
    labeller's vote counts for the other reply; a labeller with no estimate counts as 2 in 3 right);
    None when the weights cancel, or when ties and "both bad" are most of the votes."""
    if sum(c in ("tie", "both_bad") for c in choices) * 2 > len(choices):
        return None
    score = 0.0
    for name, choice in zip(voters, choices):
        if choice in ("a", "b"):
            p = min(max(accuracy.get(name, 2 / 3), 1e-3), 1 - 1e-3)
            score += math.log(p / (1 - p)) * (1 if choice == "a" else -1)
    if abs(score) < 1e-9:
        return None
    return "a" if score > 0 else "b"


def split_bucket(uid: str) -> float:
    """A stable number in [0, 1) from a hash of `uid`: rows below a share are held out."""
    return int(hashlib.sha256(f"split:{uid}".encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def split_of(uid: str, heldout_share: float) -> str:
    """'heldout' for a stable `heldout_share` of pairs, chosen by a hash of the pair's uid."""
    return "heldout" if split_bucket(uid) < heldout_share else "train"


def pair_rows(store: Store, cutoff: datetime, heldout_share: float,
              accuracy: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], int]:
    """The exported pairs, and how many labelled pairs had no winner (by majority, or by the votes
    weighted with `accuracy`, labeller name -> estimated accuracy, when given)."""
    rows, undecided = [], 0
    for p in store.pair_votes(cutoff):
        winner = majority(p["votes_a"], p["votes_b"], p["votes_tie"], p["votes_both_bad"]) if accuracy is None \
            else weighted(p["voters"], p["choices"], accuracy)
        if winner is None:
            undecided += 1
            continue
        chosen, rejected = (p["a"], p["b"]) if winner == "a" else (p["b"], p["a"])
        rows.append({
            "id": p["id"],
            "prompt": json.loads(p["messages"]),
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "split": split_of(p["uid"], heldout_share),
            "source": p["source"],
            "labellers": list(p["labellers"]),
            "contributor": p["contributor"],
        })
    return rows, undecided


def prompt_rows(store: Store, cutoff: datetime) -> list[dict[str, Any]]:
    return [{"id": r["id"], "prompt": json.loads(r["messages"]), "source": r["source"], "contributor": r["contributor"]}
            for r in store.prompt_rows(cutoff)]


def feedback_rows(store: Store, cutoff: datetime) -> list[dict[str, Any]]:
    """Thumbs as KTO rows; a score counts as desirable when above 0.5 (scores are in [0, 1]). `bucket`
    (`split_bucket` of the id) lets a trainer hold out its own share without the store's code."""
    return [{"id": r["id"], "bucket": split_bucket(str(r["id"])), "prompt": json.loads(r["messages"]),
             "completion": [{"role": "assistant", "content": r["text"]}],
             "label": r["value"] > 0.5, "kind": r["kind"], "value": r["value"], "contributor": r["contributor"]}
            for r in store.feedback_rows(cutoff)]


def content_hash(rows: list[dict[str, Any]]) -> str:
    """sha256 of the rows as canonical JSON lines: the same data hashes the same in any format."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_rows(rows: list[dict[str, Any]], path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    tmp.replace(path)


def _rows(store: Store, kind: str, cutoff: datetime, heldout_share: float,
          accuracy: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], int]:
    if kind == "pairs":
        return pair_rows(store, cutoff, heldout_share, accuracy)
    if kind == "prompts":
        return prompt_rows(store, cutoff), 0
    if kind == "feedback":
        return feedback_rows(store, cutoff), 0
    raise ValueError(f"unknown export {kind!r}; expected one of {', '.join(KINDS)}")


def _record(manifest: Manifest, kind: str, rows: list[dict[str, Any]], undecided: int, filename: str) -> None:
    manifest.counts[kind] = len(rows)
    manifest.files[kind] = filename
    manifest.content_hash[kind] = content_hash(rows)
    if kind == "pairs":
        manifest.counts["heldout"] = sum(r["split"] == "heldout" for r in rows)
        manifest.skipped["no_majority"] = undecided


def export(store: Store, kind: str, output: str | Path, fmt: str, heldout_share: float,
           cutoff: datetime | None = None, accuracy: dict[str, float] | None = None) -> Manifest:
    """Write one kind to `output`, and its manifest to `output` + '.manifest.json'."""
    output = Path(output)
    cutoff = cutoff or datetime.now()
    rows, undecided = _rows(store, kind, cutoff, heldout_share, accuracy)
    write_rows(rows, output, fmt)
    manifest = Manifest(cutoff=cutoff.isoformat(), heldout_share=heldout_share,
                        aggregate="majority" if accuracy is None else "reliability")
    _record(manifest, kind, rows, undecided, output.name)
    manifest.write(output.with_name(output.name + ".manifest.json"))
    return manifest


def snapshot(store: Store, out_dir: str | Path, heldout_share: float, cutoff: datetime | None = None,
             accuracy: dict[str, float] | None = None) -> Manifest:
    """Every kind as Parquet in `out_dir`, with one `manifest.json`: what a retrain run reads.
    `accuracy` (labeller name -> estimated accuracy): pairs labelled by weighted vote, not majority."""
    out_dir = Path(out_dir)
    cutoff = cutoff or datetime.now()
    manifest = Manifest(cutoff=cutoff.isoformat(), heldout_share=heldout_share,
                        aggregate="majority" if accuracy is None else "reliability")
    for kind in KINDS:
        rows, undecided = _rows(store, kind, cutoff, heldout_share, accuracy)
        write_rows(rows, out_dir / f"{kind}.parquet", "parquet")
        _record(manifest, kind, rows, undecided, f"{kind}.parquet")
    manifest.write(out_dir / "manifest.json")
    return manifest
