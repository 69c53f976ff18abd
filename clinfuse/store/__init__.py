"""The clinfuse store: models, runs, predictions, failures, explanations and reviews.

    store = Store(Store.default_url(run_dir))  # or "postgresql+psycopg://user@host/db"
    run_id, resumed = store.start_run(...)
    store.write_batch(run_id, predictions, failures, explanations)

See `Store` for the API; the schema is versioned by the Alembic revisions in `migrations/`.
"""

from clinfuse.store.migrations import head_revision, migrate, parse_url, store_url
from clinfuse.store.schema import named
from clinfuse.store.store import (
    ExplanationRecord,
    FailureRecord,
    PredictionRecord,
    ReviewEvent,
    Store,
    StoreError,
)

__all__ = [
    "ExplanationRecord",
    "FailureRecord",
    "PredictionRecord",
    "ReviewEvent",
    "Store",
    "StoreError",
    "head_revision",
    "migrate",
    "named",
    "parse_url",
    "store_url",
]
