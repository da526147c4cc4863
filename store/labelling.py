"""The labelling queue: who labels which pair next, leases, labels, undo, progress.

Each pair gets `overlap` independent human labels (skips do not count). A pair handed out is
leased to its labeller for `lease_s` seconds; unanswered, it returns to the queue. Nobody is
handed a pair they labelled, skipped or hold. Pairs from recent live traffic come first, then
imported ones. Every hand-out runs in one transaction under the store's lock, so concurrent
labellers can never be handed a pair beyond its overlap.

A labeller sees the two replies as "first" and "second"; which of a/b is first is fixed per pair
by a hash of its uid, so order is random across pairs but stable for one pair.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from store.database import Store, StoreError

CHOICES = ("first", "second", "tie", "both_bad", "skip")


class LabelConflict(StoreError):
    """The label cannot be taken (already labelled, or the pair has all its labels)."""


def swapped(uid: str) -> bool:
    """Whether reply b is shown first for this pair."""
    return hashlib.sha256(f"order:{uid}".encode()).digest()[0] % 2 == 1


def to_stored_choice(choice: str, uid: str) -> str:
    if choice not in CHOICES:
        raise StoreError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice in ("first", "second"):
        first_is_a = not swapped(uid)
        return "a" if (choice == "first") == first_is_a else "b"
    return choice


class LabelQueue:
    def __init__(self, store: Store, overlap: int, lease_s: float) -> None:
        self.store, self.overlap, self.lease_s = store, overlap, lease_s

    def next_pair(self, user_id: int) -> dict[str, Any] | None:
        """The pair this labeller should label now (their open lease first), or None."""
        now = datetime.now()
        with self.store.transaction() as db:
            db.execute("DELETE FROM assignments WHERE expires_at <= ?", [now])
            held = db.execute("""SELECT pair_id FROM assignments WHERE user_id = ?
                                 ORDER BY leased_at DESC LIMIT 1""", [user_id]).fetchone()
            pair_id = held[0] if held else self._pick(db, user_id)
            if pair_id is None:
                return None
            expires = now + timedelta(seconds=self.lease_s)
            if held:
                db.execute("UPDATE assignments SET expires_at = ? WHERE pair_id = ? AND user_id = ?",
                           [expires, pair_id, user_id])
            else:
                db.execute("INSERT INTO assignments (pair_id, user_id, expires_at) VALUES (?, ?, ?)",
                           [pair_id, user_id, expires])
        return self.pair_view(pair_id)

    def lease(self, user_id: int, pair_id: int) -> dict[str, Any]:
        """Hand a given pair (e.g. the user's own arena pair) to this labeller now."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM assignments WHERE user_id = ?", [user_id])
            db.execute("INSERT INTO assignments (pair_id, user_id, expires_at) VALUES (?, ?, ?)",
                       [pair_id, user_id, datetime.now() + timedelta(seconds=self.lease_s)])
        return self.pair_view(pair_id)

    def _pick(self, db, user_id: int) -> int | None:
        row = db.execute("""
            WITH human AS (
                SELECT l.pair_id, count(*) AS n FROM labels l JOIN users u ON u.id = l.user_id
                WHERE u.role <> 'system' AND l.choice <> 'skip' GROUP BY l.pair_id),
            leased AS (SELECT pair_id, count(*) AS n FROM assignments GROUP BY pair_id),
            mine AS (SELECT pair_id FROM labels WHERE user_id = ?)
            SELECT p.id FROM pairs p
            LEFT JOIN human h ON h.pair_id = p.id
            LEFT JOIN leased a ON a.pair_id = p.id
            ANTI JOIN mine m ON m.pair_id = p.id
            WHERE coalesce(h.n, 0) + coalesce(a.n, 0) < ?
            ORDER BY p.priority DESC, p.id DESC
            LIMIT 1""", [user_id, self.overlap]).fetchone()
        return row[0] if row else None

    def pair_view(self, pair_id: int) -> dict[str, Any]:
        rows = self.store._dicts("""
            SELECT p.id, p.uid, p.source, pr.messages, ra.text AS a, rb.text AS b
            FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
            JOIN responses ra ON ra.id = p.response_a_id JOIN responses rb ON rb.id = p.response_b_id
            WHERE p.id = ?""", [pair_id])
        if not rows:
            raise StoreError(f"no pair {pair_id}")
        p = rows[0]
        first, second = (p["b"], p["a"]) if swapped(p["uid"]) else (p["a"], p["b"])
        return {"pair_id": p["id"], "source": p["source"], "messages": json.loads(p["messages"]),
                "first": first, "second": second}

    def submit(self, user_id: int, pair_id: int, choice: str, rationale: str | None = None,
               seconds_spent: float | None = None) -> int:
        """Record a label (committed when this returns) and release the lease."""
        with self.store.transaction() as db:
            uid = db.execute("SELECT uid FROM pairs WHERE id = ?", [pair_id]).fetchone()
            if uid is None:
                raise StoreError(f"no pair {pair_id}")
            stored = to_stored_choice(choice, uid[0])
            if db.execute("SELECT 1 FROM labels WHERE pair_id = ? AND user_id = ?", [pair_id, user_id]).fetchone():
                raise LabelConflict(f"you have labelled pair {pair_id} already (undo it to change your label)")
            holds = db.execute("SELECT 1 FROM assignments WHERE pair_id = ? AND user_id = ? AND expires_at > ?",
                               [pair_id, user_id, datetime.now()]).fetchone()
            if not holds and stored != "skip":
                others = db.execute("""
                    SELECT (SELECT count(*) FROM labels l JOIN users u ON u.id = l.user_id
                            WHERE l.pair_id = ? AND u.role <> 'system' AND l.choice <> 'skip')
                         + (SELECT count(*) FROM assignments WHERE pair_id = ? AND expires_at > ?)""",
                    [pair_id, pair_id, datetime.now()]).fetchone()[0]
                if others >= self.overlap:
                    raise LabelConflict(f"pair {pair_id} has all its {self.overlap} labels (your lease expired)")
            db.execute("DELETE FROM assignments WHERE pair_id = ? AND user_id = ?", [pair_id, user_id])
            return db.execute("""INSERT INTO labels (pair_id, user_id, choice, rationale, seconds_spent)
                                 VALUES (?, ?, ?, ?, ?) RETURNING id""",
                              [pair_id, user_id, stored, rationale, seconds_spent]).fetchone()[0]

    def undo(self, user_id: int) -> dict[str, Any] | None:
        """Take back this labeller's last label and hand its pair back to them."""
        with self.store.transaction() as db:
            row = db.execute("""SELECT id, pair_id FROM labels WHERE user_id = ?
                                ORDER BY id DESC LIMIT 1""", [user_id]).fetchone()
            if row is None:
                return None
            label_id, pair_id = row
            db.execute("DELETE FROM labels WHERE id = ?", [label_id])
            db.execute("DELETE FROM assignments WHERE user_id = ?", [user_id])
            db.execute("INSERT INTO assignments (pair_id, user_id, expires_at) VALUES (?, ?, ?)",
                       [pair_id, user_id, datetime.now() + timedelta(seconds=self.lease_s)])
        return self.pair_view(pair_id)

    def progress(self, user_id: int) -> dict[str, int]:
        """Labels this labeller gave today, and pairs still needing labels."""
        today = datetime.now().replace(hour=0, minute=0, second=0, microsecond=0)
        done = self.store._all("SELECT count(*) FROM labels WHERE user_id = ? AND created_at >= ?",
                               [user_id, today])[0][0]
        left = self.store._all("""
            WITH human AS (
                SELECT l.pair_id, count(*) AS n FROM labels l JOIN users u ON u.id = l.user_id
                WHERE u.role <> 'system' AND l.choice <> 'skip' GROUP BY l.pair_id)
            SELECT count(*) FROM pairs p LEFT JOIN human h ON h.pair_id = p.id
            WHERE coalesce(h.n, 0) < ?""", [self.overlap])[0][0]
        return {"done_today": done, "queue": left}
