"""Alembic environment for the clinfuse store, run programmatically by `clinfuse.store`.

The store passes an open connection in `config.attributes["connection"]`, already inside the
transaction (and, on PostgreSQL, holding the migration lock), so every revision of one upgrade
commits together or not at all. There is no alembic.ini: the package is the configuration.
"""

from __future__ import annotations

from alembic import context

from clinfuse.store.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "clinfuse store migrations run through clinfuse.store.Store (or clinfuse.store.migrate), "
        "which supply the connection; the alembic command line is not supported"
    )
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
