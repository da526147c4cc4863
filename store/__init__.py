"""The store: everything alignloop knows, in one DuckDB file.

- `database.Store` holds the one connection and every SQL statement of the project.
- `migrations` lists the schema as append-only numbered steps.
- `importer` reads preference datasets (HH-RLHF, JSONL) into the store, all or nothing.
- `export` writes snapshots (pairs, prompts, feedback) for training, with a manifest.

Only one process opens the file for writing: the gateway while it runs (docs/design.md).
"""

from store.database import Store, StoreError

__all__ = ["Store", "StoreError"]
