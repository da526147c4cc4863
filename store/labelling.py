"""The labelling queue: who labels which pair next, leases, labels, undo, progress.

Each pair gets `overlap` independent human labels (skips do not count). A pair handed out is
leased to its labeller for `lease_s` seconds; unanswered, it returns to the queue. A labeller can
label only the pair handed to them (or asked for in the arena): nobody picks what they vote on. Nobody is
handed a pair they labelled, skipped or hold. Pairs from recent live traffic come first, then
imported ones; within each, `order` decides: "arrival" (newest first), "random" (a fixed shuffle,
by a hash of each pair's uid: the baseline active learning is measured against) or "active" (highest
score first: what a label would teach, `set_scores` from loop/evaluation/active.py; pairs not scored
yet sit at UNSCORED, newest first among equals). Every hand-out runs in one transaction under the
store's lock, so concurrent labellers can never be handed a pair beyond its overlap.

Which pair to hand out is decided on an in-memory index of the pairs that still need labels: built
from the store on first use, kept in step by every call here, new pairs picked up by id. Scanning
every pair and label per hand-out took about 13 ms at 100,000 pairs, and 20 labellers queue behind
one another. The store stays the record: leases and labels are committed before a call returns.
All human labels go through this class (the gateway is the only writer, docs/design.md).

A labeller sees the two replies as "first" and "second"; which of a/b is first is fixed per pair
by a hash of its uid, so order is random across pairs but stable for one pair.

Gold pairs (ones whose better reply an admin knows, `Store.add_gold_pairs`) are handed out among the
others, about `gold_share` of hand-outs, and only when a regular pair is there to hand: a labeller
cannot tell them apart (the same view, no source). Every labeller may label each gold pair once,
beyond the overlap, and they never count in the queue: they measure labellers
(loop/evaluation/reliability.py), they are not work to be done.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from store.database import Store, StoreError, _next_ids

CHOICES = ("first", "second", "tie", "both_bad", "skip")
ORDERS = ("arrival", "random", "active")
UNSCORED = 0.5  # an active queue's score of a pair made since the last ranking: nothing is known of it


class LabelConflict(StoreError):
    """The label cannot be taken (already labelled, or the pair has all its labels)."""


class NotLeased(StoreError):
    """A label on a pair that was not handed to this labeller (so nobody can pick what they vote on)."""


@dataclass(frozen=True)
class Answer:
    """One labeller's label on one pair, as sent."""
    user_id: int
    pair_id: int
    choice: str
    rationale: str | None = None
    seconds_spent: float | None = None


@dataclass(frozen=True)
class Labelled:
    """What a label's sender gets back: its id, their next pair (None: nothing left), their progress."""
    label_id: int
    pair: dict[str, Any] | None
    progress: dict[str, int]


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
    def __init__(self, store: Store, overlap: int, lease_s: float, gold_share: float = 0.0,
                 order: str = "arrival") -> None:
        if order not in ORDERS:
            raise StoreError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.store, self.overlap, self.lease_s, self.gold_share, self.order = store, overlap, lease_s, gold_share, order
        self._forget()

    def _forget(self) -> None:
        """An empty index: rebuilt from the store on next use."""
        self._loaded = False
        self._open: list[tuple[int, float, int]] = []  # _key of the pairs needing labels, ascending
        self._labels: dict[int, int] = defaultdict(int)  # pair -> human labels (skips not counted)
        self._done: dict[int, set[int]] = defaultdict(set)  # user -> pairs they labelled or skipped
        self._leases: dict[int, dict[int, datetime]] = defaultdict(dict)  # pair -> user -> lease expiry
        self._held: dict[int, int] = {}               # user -> the pair they hold
        self._priority: dict[int, int] = {}           # pair -> priority
        self._uid: dict[int, str] = {}                # pair -> content uid (which reply is shown first)
        self._score: dict[int, float] = {}            # pair -> active-learning score (pair_scores)
        self._gold: list[int] = []                     # gold pairs, ascending (never in _open)
        self._seen = 0                                 # highest pair id indexed
        self._synced_writes = -1                       # Store.pair_writes when new pairs were last looked for
        self._today: dict[int, tuple[date, int]] = {}  # user -> (day, labels given that day)

    # --- the in-memory index (always used under the store's lock) -----------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """The store's transaction with the index in step. If the store fails mid-way (not a refusal,
        which changes nothing), the transaction rolls back, and the index, maybe ahead of it, is
        rebuilt from the store on next use."""
        try:
            with self.store.transaction() as db:
                self._sync(db)
                yield db
        except StoreError:
            raise
        except BaseException:
            self._forget()
            raise

    def _sync(self, db) -> None:
        if self._loaded and self.store.pair_writes == self._synced_writes:
            return  # no pair was added since the last look (the query cost ~0.4 ms a call at 100,000 pairs)
        self._synced_writes = self.store.pair_writes
        if not self._loaded:
            for pair_id, user_id, choice in db.execute("""
                    SELECT l.pair_id, l.user_id, l.choice FROM labels l JOIN users u ON u.id = l.user_id
                    WHERE u.role <> 'system'""").fetchall():
                self._done[user_id].add(pair_id)
                self._labels[pair_id] += choice != "skip"
            for pair_id, user_id, expires in db.execute(
                    "SELECT pair_id, user_id, expires_at FROM assignments").fetchall():
                self._leases[pair_id][user_id] = expires
                self._held[user_id] = pair_id
            self._score = dict(db.execute("SELECT pair_id, score FROM pair_scores").fetchall())
            self._loaded = True
        gold = [row[0] for row in db.execute("SELECT pair_id FROM gold_answers ORDER BY pair_id").fetchall()]
        for pair_id in set(gold) - set(self._gold):  # a pair already indexed may have become gold
            if pair_id in self._priority:
                self._unopen(pair_id)
        self._gold = gold
        golden = set(gold)
        for pair_id, priority, uid in db.execute("SELECT id, priority, uid FROM pairs WHERE id > ? ORDER BY id",
                                                 [self._seen]).fetchall():
            self._priority[pair_id] = priority
            self._uid[pair_id] = uid
            if self._labels[pair_id] < self.overlap and pair_id not in golden:
                bisect.insort(self._open, self._key(pair_id))
            self._seen = pair_id

    def _key(self, pair_id: int) -> tuple[int, float, int]:
        """Where a pair sits in the open index (handed out from the highest): its priority, then its
        place by `order`, then its id."""
        if self.order == "active":
            within = self._score.get(pair_id, UNSCORED)
        elif self.order == "random":
            within = int.from_bytes(hashlib.sha256(f"shuffle:{self._uid[pair_id]}".encode()).digest()[:8], "big") / 2**64
        else:
            within = 0.0
        return self._priority[pair_id], within, pair_id

    def _unopen(self, pair_id: int) -> None:
        key = self._key(pair_id)
        i = bisect.bisect_left(self._open, key)
        if i < len(self._open) and self._open[i] == key:
            self._open.pop(i)

    def _active_leases(self, pair_id: int, now: datetime) -> int:
        leases = self._leases.get(pair_id)
        if not leases:
            return 0
        for user_id in [u for u, expires in leases.items() if expires <= now]:
            del leases[user_id]
            if self._held.get(user_id) == pair_id:
                del self._held[user_id]
        return len(leases)

    def _count(self, pair_id: int, delta: int) -> None:
        """Add to a pair's human labels, taking it out of the open index when full (or back)."""
        before = self._labels[pair_id]
        self._labels[pair_id] = before + delta
        if self._is_gold(pair_id):
            return
        if before < self.overlap <= before + delta:
            self._unopen(pair_id)
        elif before + delta < self.overlap <= before:
            bisect.insort(self._open, self._key(pair_id))

    def _take(self, user_id: int, pair_id: int, now: datetime) -> None:
        self._release(user_id)
        self._leases[pair_id][user_id] = now + timedelta(seconds=self.lease_s)
        self._held[user_id] = pair_id

    def _release(self, user_id: int) -> None:
        held = self._held.pop(user_id, None)
        if held is not None:
            self._leases[held].pop(user_id, None)

    def _write_leases(self, db, users: list[int]) -> None:
        """Make the store's leases of these labellers what the index says they are."""
        db.execute("DELETE FROM assignments WHERE user_id IN (SELECT unnest(?))", [users])
        held = [(self._held[u], u, self._leases[self._held[u]][u]) for u in dict.fromkeys(users) if u in self._held]
        if held:
            db.execute("INSERT INTO assignments (pair_id, user_id, expires_at) SELECT unnest(?), unnest(?), unnest(?)",
                       [list(column) for column in zip(*held)])

    # --- the labelling API -----------------------------------------------------------------------

    def next_pair(self, user_id: int) -> dict[str, Any] | None:
        """The pair this labeller should label now (their open lease first), or None."""
        now = datetime.now()
        with self._transaction() as db:
            pair_id = self._hand_out(user_id, now)
            self._write_leases(db, [user_id])
        return None if pair_id is None else self.pair_view(pair_id)

    def _hand_out(self, user_id: int, now: datetime) -> int | None:
        held = self._held.get(user_id)
        if held is not None and self._leases[held].get(user_id, now) > now:
            pair_id = held
        else:
            pair_id = self._pick(user_id, now)
            if pair_id is None:
                self._release(user_id)
                return None
        self._take(user_id, pair_id, now)
        return pair_id

    def _pick(self, user_id: int, now: datetime) -> int | None:
        done = self._done[user_id]
        for *_, pair_id in reversed(self._open):
            if pair_id not in done and self._labels[pair_id] + self._active_leases(pair_id, now) < self.overlap:
                return self._gold_instead(user_id, done) or pair_id
        return None

    def _gold_instead(self, user_id: int, done: set[int]) -> int | None:
        """A gold pair this labeller has not labelled, on about `gold_share` of their hand-outs (which
        ones is fixed by a hash of who and how many they have done), or None."""
        if not self._gold or self.gold_share <= 0:
            return None
        draw = int.from_bytes(hashlib.sha256(f"gold:{user_id}:{len(done)}".encode()).digest()[:8], "big") / 2**64
        if draw >= self.gold_share:
            return None
        return next((pair_id for pair_id in self._gold if pair_id not in done), None)

    def _is_gold(self, pair_id: int) -> bool:
        i = bisect.bisect_left(self._gold, pair_id)
        return i < len(self._gold) and self._gold[i] == pair_id

    # --- active learning ---------------------------------------------------------------------

    def waiting(self, limit: int) -> list[dict[str, Any]]:
        """The first `limit` pairs still needing labels, in the order they are handed out (leases
        aside), with their prompt (`messages`, and `prompt_key`: the messages as stored, the key of
        `Store.labelled_per_prompt`), replies a and b, people's decisive votes so far and score, if scored."""
        with self._transaction() as db:
            ids = [key[-1] for key in reversed(self._open[-limit:])] if limit > 0 else []
            if not ids:
                return []
            rows = db.execute("""
                WITH wanted AS (SELECT unnest(?) AS id),
                votes AS (SELECT l.pair_id, count(*) FILTER (l.choice = 'a') AS a, count(*) FILTER (l.choice = 'b') AS b
                          FROM labels l JOIN users u ON u.id = l.user_id
                          WHERE u.role <> 'system' AND l.pair_id IN (SELECT id FROM wanted) GROUP BY l.pair_id)
                SELECT p.id, pr.messages, ra.text, rb.text, coalesce(v.a, 0), coalesce(v.b, 0),
                       s.score, s.uncertainty, s.disagreement, s.novelty, s.reward_model_id, s.scored_at
                FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
                JOIN responses ra ON ra.id = p.response_a_id JOIN responses rb ON rb.id = p.response_b_id
                LEFT JOIN pair_scores s ON s.pair_id = p.id LEFT JOIN votes v ON v.pair_id = p.id
                WHERE p.id IN (SELECT id FROM wanted)""", [ids]).fetchall()
        names = ("pair_id", "messages", "a", "b", "votes_a", "votes_b", "score", "uncertainty", "disagreement",
                 "novelty", "reward_model_id", "scored_at")
        by_id = {r[0]: {**dict(zip(names, r)), "messages": json.loads(r[1]), "prompt_key": r[1]} for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def set_scores(self, scores: list[dict[str, Any]], reward_model_id: int | None) -> int:
        """Replace the scores of these pairs (dicts with pair_id, score, uncertainty, disagreement,
        novelty; pairs not in the store are left out) and reorder the open index by them. Returns how
        many were stored."""
        with self._transaction() as db:
            known = [s for s in scores if s["pair_id"] in self._uid]
            if not known:
                return 0
            ids = [s["pair_id"] for s in known]
            db.execute("DELETE FROM pair_scores WHERE pair_id IN (SELECT unnest(?))", [ids])
            db.execute("""INSERT INTO pair_scores (pair_id, score, uncertainty, disagreement, novelty, reward_model_id)
                          SELECT unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), ?""",
                       [ids, *([float(s[k]) for s in known] for k in ("score", "uncertainty", "disagreement", "novelty")),
                        reward_model_id])
            self._score.update((s["pair_id"], float(s["score"])) for s in known)
            self._open = sorted(self._key(key[-1]) for key in self._open)
        return len(known)

    def lease(self, user_id: int, pair_id: int) -> dict[str, Any]:
        """Hand a given pair (e.g. the user's own arena pair) to this labeller now."""
        with self._transaction() as db:
            self._take(user_id, pair_id, datetime.now())
            self._write_leases(db, [user_id])
        return self.pair_view(pair_id)

    def pair_view(self, pair_id: int) -> dict[str, Any]:
        view = self.pair_views([pair_id]).get(pair_id)
        if view is None:
            raise StoreError(f"no pair {pair_id}")
        return view

    def pair_views(self, pair_ids: list[int], db=None) -> dict[int, dict[str, Any]]:
        """What a labeller sees of each pair (the replies as first and second, and whether each was
        cut off at its length limit), by pair id: nothing says where it came from, so a gold pair
        looks like any other."""
        if not pair_ids:
            return {}
        if db is None:
            with self.store.reading() as conn:
                return self.pair_views(pair_ids, conn)
        one = len(pair_ids) == 1  # an equality filter is looked up in the primary key's index: 2.5 ms, not 4
        rows = db.execute(f"""
            SELECT p.id, p.uid, pr.messages, ra.text AS a, rb.text AS b,
                   ra.finish_reason = 'length' AS a_cut, rb.finish_reason = 'length' AS b_cut
            FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id
            JOIN responses ra ON ra.id = p.response_a_id JOIN responses rb ON rb.id = p.response_b_id
            WHERE {"p.id = ?" if one else "p.id IN (SELECT unnest(?))"}""", [pair_ids[0] if one else pair_ids]).fetchall()
        views = {}
        for pair_id, uid, messages, a, b, a_cut, b_cut in rows:
            first, second = ((b, b_cut), (a, a_cut)) if swapped(uid) else ((a, a_cut), (b, b_cut))
            views[pair_id] = {"pair_id": pair_id, "messages": json.loads(messages), "first": first[0],
                              "second": second[0], "first_cut_off": bool(first[1]), "second_cut_off": bool(second[1])}
        return views

    def submit(self, user_id: int, pair_id: int, choice: str, rationale: str | None = None,
               seconds_spent: float | None = None) -> int:
        """Record a label on the pair this labeller holds (committed when this returns) and release
        the lease. A lease that expired still counts while the pair lacks labels."""
        return self._one(Answer(user_id, pair_id, choice, rationale, seconds_spent), hand_out=False).label_id

    def submit_and_next(self, user_id: int, pair_id: int, choice: str, rationale: str | None = None,
                        seconds_spent: float | None = None) -> tuple[int, dict[str, Any] | None]:
        """`submit`, then `next_pair`, in one transaction (one commit a label instead of two)."""
        done = self._one(Answer(user_id, pair_id, choice, rationale, seconds_spent), hand_out=True)
        return done.label_id, done.pair

    def _one(self, answer: Answer, hand_out: bool) -> Labelled:
        (result,) = self.label_many([answer], hand_out)
        if isinstance(result, StoreError):
            raise result
        return result

    def label_many(self, answers: list[Answer], hand_out: bool = True) -> list[Labelled | StoreError]:
        """Several labels (from any labellers, in order) and each sender's next pair, in one
        transaction: one commit for all, so labellers at full speed do not queue behind one another's
        commits. Each answer gets what `submit_and_next` would have given it, called in this order:
        a refusal (LabelConflict, NotLeased, StoreError) for that answer alone; the others stand."""
        now = datetime.now()
        with self._transaction() as db:
            results: list[Labelled | StoreError | tuple[int, Answer, str, int | None]] = []
            taken = []
            for a in answers:
                try:
                    stored = self._check(a, now)
                except StoreError as e:
                    results.append(e)
                    continue
                self._apply(a, stored, now)
                next_id = self._hand_out(a.user_id, now) if hand_out else None
                results.append((len(taken), a, stored, next_id))
                taken.append((a, stored))
            if not taken:
                return results  # type: ignore[return-value]
            label_ids = self._insert_labels(db, taken)
            self._write_leases(db, [a.user_id for a, _ in taken])
            views = self.pair_views([r[3] for r in results if isinstance(r, tuple) and r[3] is not None], db)
            progress = {a.user_id: self._progress(db, a.user_id) for a, _ in taken}
        return [r if isinstance(r, StoreError) else
                Labelled(label_ids[r[0]], None if r[3] is None else views[r[3]], progress[r[1].user_id])
                for r in results]

    def _check(self, a: Answer, now: datetime) -> str:
        """The stored choice ('a', 'b', ...) of a label that may be taken now; raises the refusal if not.
        Changes nothing."""
        uid = self._uid.get(a.pair_id)
        if uid is None:
            raise StoreError(f"no pair {a.pair_id}")
        stored = to_stored_choice(a.choice, uid)
        if a.pair_id in self._done[a.user_id]:
            raise LabelConflict(f"you have labelled pair {a.pair_id} already (undo it to change your label)")
        holds = self._leases[a.pair_id].get(a.user_id, now) > now
        if not holds and stored != "skip" and not self._is_gold(a.pair_id):
            if self._labels[a.pair_id] + self._active_leases(a.pair_id, now) >= self.overlap:
                raise LabelConflict(f"pair {a.pair_id} has all its {self.overlap} labels (your lease expired)")
        if self._held.get(a.user_id) != a.pair_id:
            raise NotLeased(f"pair {a.pair_id} was not handed to you: label the pair you were given "
                            "(GET /api/label/next), or one you asked for in the arena")
        return stored

    def _apply(self, a: Answer, stored: str, now: datetime) -> None:
        """A taken label in the index: the lease released, the pair done for its labeller, counted."""
        self._release(a.user_id)
        self._done[a.user_id].add(a.pair_id)
        if stored != "skip":  # a skip is no label: it neither fills the pair nor counts as labelled today
            self._count(a.pair_id, +1)
            self._labelled_today(a.user_id, +1, now.date())

    @staticmethod
    def _insert_labels(db, taken: list[tuple[Answer, str]]) -> list[int]:
        ids = _next_ids(db, "labels", len(taken))
        db.execute("""INSERT INTO labels (id, pair_id, user_id, choice, rationale, seconds_spent)
                      SELECT unnest(?), unnest(?), unnest(?), unnest(?), unnest(?::VARCHAR[]), unnest(?::DOUBLE[])""",
                   [ids, [a.pair_id for a, _ in taken], [a.user_id for a, _ in taken], [c for _, c in taken],
                    [a.rationale for a, _ in taken], [a.seconds_spent for a, _ in taken]])
        return ids

    def undo(self, user_id: int) -> dict[str, Any] | None:
        """Take back this labeller's last label and hand its pair back to them."""
        with self._transaction() as db:
            row = db.execute("""SELECT id, pair_id, choice, created_at FROM labels WHERE user_id = ?
                                ORDER BY id DESC LIMIT 1""", [user_id]).fetchone()
            if row is None:
                return None
            label_id, pair_id, choice, created = row
            db.execute("DELETE FROM labels WHERE id = ?", [label_id])
            self._done[user_id].discard(pair_id)
            if choice != "skip":
                self._count(pair_id, -1)
                self._labelled_today(user_id, -1, created.date())
            self._take(user_id, pair_id, datetime.now())
            self._write_leases(db, [user_id])
        return self.pair_view(pair_id)

    def _labelled_today(self, user_id: int, delta: int, day: date) -> None:
        counted = self._today.get(user_id)
        if counted is not None and counted[0] == day:
            self._today[user_id] = (day, counted[1] + delta)

    def progress(self, user_id: int) -> dict[str, int]:
        """Labels this labeller gave today, and pairs still needing labels (counted in memory; the
        store is asked once a day per labeller)."""
        with self.store.reading() as db:
            self._sync(db)
            return self._progress(db, user_id)

    def _progress(self, db, user_id: int) -> dict[str, int]:
        today = date.today()
        counted = self._today.get(user_id)
        if counted is None or counted[0] != today:
            n = db.execute("SELECT count(*) FROM labels WHERE user_id = ? AND created_at >= ? AND choice <> 'skip'",
                           [user_id, datetime.combine(today, datetime.min.time())]).fetchone()[0]
            counted = self._today[user_id] = (today, n)
        return {"done_today": counted[1], "queue": len(self._open)}
