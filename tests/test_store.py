"""The store: schema from blank, forward migration with no data lost, users, thread safety."""

import threading

import duckdb
import pytest

from store import Store, StoreError, migrations
from store.database import NewPair

EXPECTED_SCHEMA = {
    "assignments": ["pair_id BIGINT", "user_id BIGINT", "leased_at TIMESTAMP", "expires_at TIMESTAMP"],
    "exchanges": ["id BIGINT", "request_id VARCHAR", "endpoint VARCHAR", "model_requested VARCHAR",
                  "version_id BIGINT", "user_id BIGINT", "prompt_id BIGINT", "status INTEGER",
                  "latency_ms DOUBLE", "prompt_tokens INTEGER", "completion_tokens INTEGER", "created_at TIMESTAMP"],
    "feedback": ["id BIGINT", "response_id BIGINT", "user_id BIGINT", "kind VARCHAR", "value DOUBLE",
                 "comment VARCHAR", "created_at TIMESTAMP"],
    "labels": ["id BIGINT", "pair_id BIGINT", "user_id BIGINT", "choice VARCHAR", "rationale VARCHAR",
               "seconds_spent DOUBLE", "created_at TIMESTAMP"],
    "model_versions": ["id BIGINT", "name VARCHAR", "parent_id BIGINT", "method VARCHAR", "adapter_path VARCHAR",
                       "snapshot_hash VARCHAR", "config VARCHAR", "metrics VARCHAR", "status VARCHAR",
                       "created_at TIMESTAMP"],
    "pairs": ["id BIGINT", "uid VARCHAR", "prompt_id BIGINT", "response_a_id BIGINT", "response_b_id BIGINT",
              "source VARCHAR", "priority INTEGER", "created_at TIMESTAMP"],
    "promotions": ["id BIGINT", "alias VARCHAR", "version_id BIGINT", "previous_version_id BIGINT",
                   "actor VARCHAR", "reason VARCHAR", "created_at TIMESTAMP"],
    "prompts": ["id BIGINT", "messages VARCHAR", "source VARCHAR", "created_at TIMESTAMP"],
    "responses": ["id BIGINT", "prompt_id BIGINT", "exchange_id BIGINT", "choice_index INTEGER", "text VARCHAR",
                  "version_id BIGINT", "sampling VARCHAR", "latency_ms DOUBLE", "prompt_tokens INTEGER",
                  "completion_tokens INTEGER", "finish_reason VARCHAR", "source VARCHAR", "created_at TIMESTAMP"],
    "run_metrics": ["run_id BIGINT", "step INTEGER", "name VARCHAR", "value DOUBLE", "created_at TIMESTAMP"],
    "reward_models": ["id BIGINT", "run_id BIGINT", "path VARCHAR", "base_model VARCHAR", "snapshot_hash VARCHAR",
                      "accuracy DOUBLE", "metrics VARCHAR", "created_at TIMESTAMP", "purpose VARCHAR"],
    "runs": ["id BIGINT", "method VARCHAR", "trigger VARCHAR", "status VARCHAR", "snapshot_hash VARCHAR",
             "candidate_version_id BIGINT", "config VARCHAR", "metrics VARCHAR", "reason VARCHAR",
             "labels_at_start BIGINT", "started_at TIMESTAMP", "heartbeat_at TIMESTAMP", "finished_at TIMESTAMP"],
    "gold_answers": ["pair_id BIGINT", "answer VARCHAR", "source VARCHAR", "created_at TIMESTAMP"],
    "pair_scores": ["pair_id BIGINT", "score DOUBLE", "uncertainty DOUBLE", "disagreement DOUBLE", "novelty DOUBLE",
                    "reward_model_id BIGINT", "scored_at TIMESTAMP"],
    "settings": ["key VARCHAR", "value VARCHAR", "updated_by VARCHAR", "updated_at TIMESTAMP"],
    "schema_migrations": ["version INTEGER", "name VARCHAR", "applied_at TIMESTAMP"],
    "users": ["id BIGINT", "name VARCHAR", "role VARCHAR", "token_hash VARCHAR", "excluded_at TIMESTAMP",
              "excluded_by VARCHAR", "created_at TIMESTAMP"],
}


def _pair(i: int) -> NewPair:
    return NewPair([{"role": "user", "content": f"question {i}"}], f"good answer {i}", f"bad answer {i}")


def test_migrate_from_blank_gives_exactly_the_schema(store):
    schema = {t: [f"{c} {ty}" for c, ty in cols] for t, cols in store.schema().items()}
    assert schema == EXPECTED_SCHEMA
    assert store.counts()["model_versions"] == 1  # version 0, the base model


def test_reopening_applies_nothing_and_keeps_data(tmp_path):
    path = tmp_path / "a.duckdb"
    with Store(path) as s:
        s.add_labelled_pairs([_pair(1)], "test", "dataset:test")
    with Store(path) as s:
        assert s.counts()["pairs"] == 1
        assert s._all("SELECT count(*) FROM schema_migrations")[0][0] == len(migrations.MIGRATIONS)


def test_an_older_database_migrates_forward_with_no_data_lost(tmp_path, monkeypatch):
    path = tmp_path / "old.duckdb"
    with Store(path) as s:  # made by "the older version": every migration up to today's
        s.add_labelled_pairs([_pair(i) for i in range(5)], "test", "dataset:test")

    def m_next_add_column(db):
        db.execute("ALTER TABLE pairs ADD COLUMN note VARCHAR DEFAULT 'none'")

    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS + [m_next_add_column])
    with Store(path) as s:
        assert s._all("SELECT count(*), min(note) FROM pairs")[0] == (5, "none")
        assert s._all("SELECT max(version), last(name ORDER BY version) FROM schema_migrations")[0] == (
            len(migrations.MIGRATIONS), "m_next_add_column")


def test_a_database_of_the_first_release_gains_the_reward_models_table(tmp_path, monkeypatch):
    path = tmp_path / "release1.duckdb"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])  # what session 1 shipped
    with Store(path) as s:
        s.add_labelled_pairs([_pair(i) for i in range(3)], "test", "dataset:test")
        assert "reward_models" not in s.schema()
    monkeypatch.undo()
    with Store(path) as s:
        assert s.counts()["pairs"] == 3
        assert "reward_models" in s.schema()
        assert s._all("SELECT name FROM schema_migrations ORDER BY version")[-1][0] == migrations.MIGRATIONS[-1].__name__


def test_a_database_of_release_three_keeps_its_runs_and_gains_held_runs_and_judges(tmp_path, monkeypatch):
    from store.reward_models import RewardModels
    from store.runs import Runs

    path = tmp_path / "release3.duckdb"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
    with Store(path) as s:
        run = Runs(s).start("dpo", "manual")
        Runs(s).finish(run["id"], "rejected", "win rate 0.5", {"win_rate": 0.5})
        s._all(f"INSERT INTO reward_models (run_id, path, accuracy) VALUES ({run['id']}, '/rm', 0.8)")
        with pytest.raises(Exception):
            s._all("UPDATE runs SET status = 'held'")
    monkeypatch.undo()
    with Store(path) as s:
        runs = Runs(s)
        old = runs.get(run["id"])
        assert (old["status"], old["reason"], old["method"]) == ("rejected", "win rate 0.5", "dpo")
        assert RewardModels(s).latest()["purpose"] == "reward"  # what PPO trained against, before judges
        new = runs.start("ppo", "cron")
        assert new["id"] == run["id"] + 1  # the sequence goes on
        assert runs.finish(new["id"], "held", "no trustworthy judge")["status"] == "held"
        RewardModels(s).add("/judge", run_id=new["id"], accuracy=0.9, purpose="judge")
        assert RewardModels(s).latest("judge")["path"] == "/judge"
        assert [r["path"] for r in RewardModels(s).list(purpose="reward")] == ["/rm"]


def test_a_database_of_release_two_gains_apps_and_exclusions_keeping_users_and_their_tokens(tmp_path, monkeypatch):
    path = tmp_path / "release2.duckdb"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
    with Store(path) as s:
        token = s.add_user("ann", "labeller")
        s.add_labelled_pairs([_pair(1)], "test", "dataset:test")
        a, _ = s.pair_response_ids(s.pair_ids()[0])
        uid = s.user_by_token(token)["id"]
        for value in (1.0, 0.0):  # release 2 kept every thumb of one caller
            s.add_feedback(a, "thumbs", value, user_id=uid)
        with pytest.raises(Exception):
            s._all("INSERT INTO users (name, role) VALUES ('bot', 'app')")
    monkeypatch.undo()
    with Store(path) as s:
        assert s.user_by_token(token) == {"id": uid, "name": "ann", "role": "labeller"}
        assert s._all("SELECT value FROM feedback") == [(0.0,)]  # the caller's latest
        s.add_user("bot", "app")
        assert [u["name"] for u in s.users()] == ["ann", "dataset:test", "bot"]  # ids kept, the sequence goes on


def test_a_later_feedback_of_one_caller_replaces_the_earlier(store):
    store.add_labelled_pairs([_pair(1)], "test", "dataset:test")
    a, _ = store.pair_response_ids(store.pair_ids()[0])
    ann, bob = (store.user_by_token(store.add_user(n, "app"))["id"] for n in ("ann", "bob"))
    for value, who in ((1.0, ann), (0.0, ann), (1.0, bob), (0.0, None), (1.0, None)):
        store.add_feedback(a, "thumbs", value, user_id=who)
    assert sorted(store._all("SELECT user_id, value FROM feedback"), key=str) == sorted(
        [(ann, 0.0), (bob, 1.0), (None, 1.0)], key=str)


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "a.duckdb"
    with Store(path) as s:
        s.add_labelled_pairs([_pair(1)], "test", "dataset:test")

    def m_broken(db):
        db.execute("ALTER TABLE pairs ADD COLUMN half VARCHAR")
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS + [m_broken])
    with pytest.raises(RuntimeError, match="boom"):
        Store(path)
    monkeypatch.undo()
    with Store(path) as s:
        assert "half" not in [c for c, _ in s.schema()["pairs"]]
        assert s.counts()["pairs"] == 1


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "new.duckdb"
    Store(path).close()
    db = duckdb.connect(str(path))
    db.execute("INSERT INTO schema_migrations (version, name) VALUES (999, 'm999_future')")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this alignloop"):
        Store(path)


def test_a_second_writer_process_gets_a_clear_error(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "locked.duckdb"
    with Store(path):
        code = f"from store import Store\nStore({str(path)!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "open in another process" in out.stderr


def test_a_file_that_is_not_duckdb_is_refused_clearly(tmp_path):
    path = tmp_path / "junk.duckdb"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="junk.duckdb"):
        Store(path)


def test_users_get_a_token_and_only_its_hash_is_stored(store):
    token = store.add_user("ana", "labeller")
    assert store.user_by_token(token)["name"] == "ana"
    assert store.user_by_token("wrong") is None
    assert token not in str(store._all("SELECT * FROM users"))
    with pytest.raises(StoreError, match="exists already"):
        store.add_user("ana", "admin")
    with pytest.raises(StoreError, match="role must be one of"):
        store.add_user("bob", "owner")


def test_writes_from_many_threads_all_land(tmp_path):
    with Store(tmp_path / "t.duckdb") as s:
        errors = []

        def work(t):
            try:
                for i in range(20):
                    s.add_labelled_pairs([_pair(t * 1000 + i)], "test", "dataset:test")
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert s.counts()["pairs"] == 160 and s.counts()["labels"] == 160


def test_same_pair_twice_is_stored_once(store):
    assert store.add_labelled_pairs([_pair(1), _pair(1), _pair(2)], "test", "dataset:test") == (2, 1)
    assert store.add_labelled_pairs([_pair(2)], "test", "dataset:test") == (0, 1)
    assert store.counts()["pairs"] == 2


def test_head_to_head_gives_one_versions_verdicts_against_another(store):
    store.add_version("/a", "dpo")  # v1
    ann = store.user_by_token(store.add_user("ann", "labeller"))["id"]
    bob = store.user_by_token(store.add_user("bob", "labeller"))["id"]
    msgs = [{"role": "user", "content": "hi"}]
    votes = [(1, [("a", ann)]), (0, [("a", ann)]), (1, [("tie", ann)]), (0, [("b", ann), ("a", bob)]),
             (1, [("both_bad", ann), ("skip", bob)])]
    for i, (first, labels) in enumerate(votes):
        pid = store.add_generated_pair(msgs, (f"x{i}", first), (f"y{i}", 1 - first), "arena", 2)
        for choice, uid in labels:
            store._all("INSERT INTO labels (pair_id, user_id, choice) VALUES (?, ?, ?)", [pid, uid, choice])
    # v1 won; lost (its answer was b); tied; won by ann and lost by bob on one pair: counted once, 1/2
    assert store.head_to_head(1, 0) == [1.0, 0.0, 0.5, 0.5]
    assert store.head_to_head(0, 1) == [0.0, 1.0, 0.5, 0.5]
    store.exclude_user("bob", by="admin")
    assert store.head_to_head(1, 0) == [1.0, 0.0, 0.5, 1.0]  # an excluded labeller's votes leave the gate too
