"""Reward models: each refresh is recorded with what it was fitted on and its held-out accuracy."""

from __future__ import annotations

import json
from typing import Any

from store.database import Store, StoreError


class RewardModels:
    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, path: str, run_id: int | None = None, base_model: str | None = None,
            snapshot_hash: str | None = None, accuracy: float | None = None,
            metrics: dict[str, Any] | None = None, purpose: str = "reward") -> dict[str, Any]:
        """`purpose`: "reward" (PPO optimises against it) or "judge" (the gate's)."""
        with self.store.transaction() as db:
            new_id = db.execute("""INSERT INTO reward_models (run_id, path, base_model, snapshot_hash, accuracy, metrics,
                                                              purpose)
                                   VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id""",
                                [run_id, path, base_model, snapshot_hash, accuracy,
                                 json.dumps(metrics) if metrics is not None else None, purpose]).fetchone()[0]
        return self.get(new_id)

    def get(self, reward_model_id: int) -> dict[str, Any]:
        rows = self.store._dicts("SELECT * FROM reward_models WHERE id = ?", [reward_model_id])
        if not rows:
            raise StoreError(f"no reward model {reward_model_id}")
        return rows[0]

    def list(self, limit: int = 100, purpose: str | None = None) -> list[dict[str, Any]]:
        """Newest first; only those for `purpose` when given."""
        if purpose is None:
            return self.store._dicts("SELECT * FROM reward_models ORDER BY id DESC LIMIT ?", [limit])
        return self.store._dicts("SELECT * FROM reward_models WHERE purpose = ? ORDER BY id DESC LIMIT ?",
                                 [purpose, limit])

    def latest(self, purpose: str | None = None) -> dict[str, Any] | None:
        rows = self.list(1, purpose)
        return rows[0] if rows else None
