"""Schema migrations: an append-only list of numbered functions, recorded in `schema_migrations`.

Never edit a migration once it has shipped: add the next number. `migrate` applies, in one
transaction each, every migration the database has not seen, so a file made by an older version
moves forward with no data lost.
"""

from __future__ import annotations

from collections.abc import Callable

import duckdb


def m001_initial(db: duckdb.DuckDBPyConnection) -> None:
    """Every table of the loop: traffic, pairs, labels, feedback, users, versions, runs."""
    for name in ("users", "prompts", "responses", "exchanges", "pairs", "labels", "feedback",
                 "model_versions", "promotions", "runs"):
        db.execute(f"CREATE SEQUENCE {name}_id_seq START 1")
    db.execute("""
        CREATE TABLE users (
            id BIGINT PRIMARY KEY DEFAULT nextval('users_id_seq'),
            name VARCHAR NOT NULL UNIQUE,
            role VARCHAR NOT NULL CHECK (role IN ('labeller', 'admin', 'system')),
            token_hash VARCHAR UNIQUE,            -- sha256 of the sign-in token; NULL: cannot sign in
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE prompts (
            id BIGINT PRIMARY KEY DEFAULT nextval('prompts_id_seq'),
            messages VARCHAR NOT NULL,            -- JSON list of {role, content}, ending with a user turn
            source VARCHAR NOT NULL,              -- 'live', 'import:<file>', 'arena', ...
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE model_versions (
            id BIGINT PRIMARY KEY,                -- 0 is the base model
            name VARCHAR NOT NULL UNIQUE,
            parent_id BIGINT,
            method VARCHAR NOT NULL,              -- 'base', 'dpo', 'ppo', 'kto', ...
            adapter_path VARCHAR,                 -- PEFT adapter directory; NULL for the base
            snapshot_hash VARCHAR,
            config VARCHAR,                       -- JSON: the resolved config it was trained with
            metrics VARCHAR,                      -- JSON: evaluation results
            status VARCHAR NOT NULL CHECK (status IN ('base', 'candidate', 'serving', 'retired', 'rejected', 'failed')),
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("INSERT INTO model_versions (id, name, method, status) VALUES (0, 'base', 'base', 'base')")
    db.execute("""
        CREATE TABLE promotions (
            id BIGINT PRIMARY KEY DEFAULT nextval('promotions_id_seq'),
            alias VARCHAR NOT NULL,
            version_id BIGINT NOT NULL,
            previous_version_id BIGINT,
            actor VARCHAR,
            reason VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE exchanges (
            id BIGINT PRIMARY KEY DEFAULT nextval('exchanges_id_seq'),
            request_id VARCHAR NOT NULL UNIQUE,   -- the id the gateway returned to the client
            endpoint VARCHAR NOT NULL,            -- 'chat.completions', 'completions'
            model_requested VARCHAR,
            version_id BIGINT,
            user_id BIGINT,                       -- the API key's owner, if any
            prompt_id BIGINT,
            status INTEGER NOT NULL,              -- HTTP status returned
            latency_ms DOUBLE,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,            -- all choices together
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE responses (
            id BIGINT PRIMARY KEY DEFAULT nextval('responses_id_seq'),
            prompt_id BIGINT NOT NULL,
            exchange_id BIGINT,                   -- NULL for imported or generated responses
            choice_index INTEGER NOT NULL DEFAULT 0,
            text VARCHAR NOT NULL,
            version_id BIGINT,                    -- model version that wrote it; NULL if unknown (imported)
            sampling VARCHAR,                     -- JSON sampling parameters
            latency_ms DOUBLE,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            finish_reason VARCHAR,
            source VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE pairs (
            id BIGINT PRIMARY KEY DEFAULT nextval('pairs_id_seq'),
            uid VARCHAR NOT NULL UNIQUE,          -- content hash: same prompt and replies, same pair
            prompt_id BIGINT NOT NULL,
            response_a_id BIGINT NOT NULL,
            response_b_id BIGINT NOT NULL,
            source VARCHAR NOT NULL,              -- 'live', 'import:<file>', 'arena', ...
            priority INTEGER NOT NULL DEFAULT 0,  -- higher first in the labelling queue
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE labels (
            id BIGINT PRIMARY KEY DEFAULT nextval('labels_id_seq'),
            pair_id BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            choice VARCHAR NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad', 'skip')),
            rationale VARCHAR,
            seconds_spent DOUBLE,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE feedback (
            id BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
            response_id BIGINT NOT NULL,
            user_id BIGINT,
            kind VARCHAR NOT NULL CHECK (kind IN ('thumbs', 'score')),
            value DOUBLE NOT NULL,                -- thumbs: 1 up, 0 down; score: as given
            comment VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE runs (
            id BIGINT PRIMARY KEY DEFAULT nextval('runs_id_seq'),
            method VARCHAR NOT NULL,
            trigger VARCHAR NOT NULL,             -- 'manual', 'cron', 'labels', ...
            status VARCHAR NOT NULL CHECK (status IN ('running', 'promoted', 'rejected', 'failed', 'skipped')),
            snapshot_hash VARCHAR,
            candidate_version_id BIGINT,
            config VARCHAR,
            metrics VARCHAR,                      -- JSON: final metrics
            reason VARCHAR,                       -- why rejected, failed or skipped
            labels_at_start BIGINT,               -- human labels in the store when it started
            started_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp(),
            heartbeat_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp(),
            finished_at TIMESTAMP
        )""")
    db.execute("""
        CREATE TABLE run_metrics (
            run_id BIGINT NOT NULL,
            step INTEGER NOT NULL,
            name VARCHAR NOT NULL,
            value DOUBLE NOT NULL,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""
        CREATE TABLE assignments (
            pair_id BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            leased_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp(),
            expires_at TIMESTAMP NOT NULL     -- after this the pair returns to the queue
        )""")
    db.execute("""
        CREATE TABLE settings (
            key VARCHAR PRIMARY KEY,          -- 'guidelines', ...
            value VARCHAR NOT NULL,
            updated_by VARCHAR,
            updated_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("CREATE INDEX labels_pair ON labels (pair_id)")
    db.execute("CREATE INDEX labels_user ON labels (user_id)")
    db.execute("CREATE INDEX responses_exchange ON responses (exchange_id)")


def m002_reward_models(db: duckdb.DuckDBPyConnection) -> None:
    """Reward models, one per refresh (a PPO run fits one on every labelled pair so far)."""
    db.execute("CREATE SEQUENCE reward_models_id_seq START 1")
    db.execute("""
        CREATE TABLE reward_models (
            id BIGINT PRIMARY KEY DEFAULT nextval('reward_models_id_seq'),
            run_id BIGINT,                        -- the run that fitted it; NULL if registered by hand
            path VARCHAR NOT NULL,                -- directory (see loop/training/reward.py)
            base_model VARCHAR,
            snapshot_hash VARCHAR,                -- the labelled pairs it was fitted on
            accuracy DOUBLE,                      -- held-out preference accuracy
            metrics VARCHAR,                      -- JSON
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")


def m003_apps_and_exclusions(db: duckdb.DuckDBPyConnection) -> None:
    """The `app` role (an application's API key, /v1 only); users whose contributions are excluded
    from snapshots; one feedback per (response, caller), the latest kept. (DuckDB cannot alter a
    CHECK constraint, so the users table is made anew with the same ids.)"""
    db.execute("""
        CREATE TABLE users_m003 (
            id BIGINT PRIMARY KEY DEFAULT nextval('users_id_seq'),
            name VARCHAR NOT NULL UNIQUE,
            role VARCHAR NOT NULL CHECK (role IN ('labeller', 'admin', 'app', 'system')),
            token_hash VARCHAR UNIQUE,            -- sha256 of the sign-in token; NULL: cannot sign in
            excluded_at TIMESTAMP,                -- set: nothing this user gave goes into a snapshot
            excluded_by VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")
    db.execute("""INSERT INTO users_m003 (id, name, role, token_hash, created_at)
                  SELECT id, name, role, token_hash, created_at FROM users""")
    db.execute("DROP TABLE users")
    db.execute("ALTER TABLE users_m003 RENAME TO users")
    db.execute("""DELETE FROM feedback WHERE id NOT IN (
                      SELECT max(id) FROM feedback GROUP BY response_id, user_id)""")
    db.execute("CREATE INDEX feedback_response ON feedback (response_id)")


def m004_held_runs_and_judges(db: duckdb.DuckDBPyConnection) -> None:
    """A run may end `held`: the gate could not decide (no trustworthy judge, a judge that failed,
    too few prompts), so its candidate waits for a person. Reward models say what they are for:
    `reward` (PPO optimises against it) or `judge` (the gate's, refreshed every cycle). (The runs
    table is made anew with the same ids, as DuckDB cannot alter a CHECK.)"""
    db.execute("""
        CREATE TABLE runs_m004 (
            id BIGINT PRIMARY KEY DEFAULT nextval('runs_id_seq'),
            method VARCHAR NOT NULL,
            trigger VARCHAR NOT NULL,             -- 'manual', 'cron', 'labels', ...
            status VARCHAR NOT NULL CHECK (status IN ('running', 'promoted', 'rejected', 'held', 'failed', 'skipped')),
            snapshot_hash VARCHAR,
            candidate_version_id BIGINT,
            config VARCHAR,
            metrics VARCHAR,                      -- JSON: final metrics
            reason VARCHAR,                       -- why rejected, held, failed or skipped
            labels_at_start BIGINT,               -- human labels in the store when it started
            started_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp(),
            heartbeat_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp(),
            finished_at TIMESTAMP
        )""")
    db.execute("INSERT INTO runs_m004 SELECT * FROM runs")
    db.execute("DROP TABLE runs")
    db.execute("ALTER TABLE runs_m004 RENAME TO runs")
    db.execute("ALTER TABLE reward_models ADD COLUMN purpose VARCHAR NOT NULL DEFAULT 'reward'")


def m005_gold_answers(db: duckdb.DuckDBPyConnection) -> None:
    """Gold pairs: pairs whose right answer an admin knows, handed to labellers among the others
    (who are never told which) to measure each labeller against a truth; never trained on."""
    db.execute("""
        CREATE TABLE gold_answers (
            pair_id BIGINT PRIMARY KEY,
            answer VARCHAR NOT NULL CHECK (answer IN ('a', 'b')),   -- the better reply of the pair
            source VARCHAR,
            created_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")


def m006_pair_scores(db: duckdb.DuckDBPyConnection) -> None:
    """Active learning: how much a label on each waiting pair would teach (loop/evaluation/active.py),
    the order an active queue hands pairs out in, and the parts the score is made of, for admins."""
    db.execute("""
        CREATE TABLE pair_scores (
            pair_id BIGINT PRIMARY KEY,
            score DOUBLE NOT NULL,            -- higher first
            uncertainty DOUBLE NOT NULL,      -- of the reward model below: 1 = cannot tell a from b
            disagreement DOUBLE NOT NULL,     -- of the votes so far: 1 = split evenly
            novelty DOUBLE NOT NULL,          -- 1 / (1 + pairs of its prompt labelled or ranked ahead)
            reward_model_id BIGINT,           -- what scored it
            scored_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp()
        )""")


MIGRATIONS: list[Callable[[duckdb.DuckDBPyConnection], None]] = [
    m001_initial,
    m002_reward_models,
    m003_apps_and_exclusions,
    m004_held_runs_and_judges,
    m005_gold_answers,
    m006_pair_scores,
]


def applied(db: duckdb.DuckDBPyConnection) -> list[int]:
    db.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,
        applied_at TIMESTAMP NOT NULL DEFAULT current_localtimestamp())""")
    return [row[0] for row in db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()]


def migrate(db: duckdb.DuckDBPyConnection) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied."""
    done = set(applied(db))
    newer = max(done, default=0)
    if newer > len(MIGRATIONS):
        raise RuntimeError(f"the database is at schema version {newer}, newer than this alignloop "
                           f"({len(MIGRATIONS)}): upgrade alignloop to open it")
    names = []
    for number, fn in enumerate(MIGRATIONS, start=1):
        if number in done:
            continue
        db.execute("BEGIN TRANSACTION")
        try:
            fn(db)
            db.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [number, fn.__name__])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        names.append(fn.__name__)
    return names
