"""Reviews: an index for a study's history, and a database guard that keeps them append-only.

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-10

The API has no way to change a review; the triggers make the database refuse it too, so the
audit trail survives a stray UPDATE or DELETE from any other client.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MESSAGE = "reviews are append-only; add a new review event instead"


def upgrade() -> None:
    op.create_index(
        op.f("ix_reviews_run_id_study_id_created_at"),
        "reviews",
        ["run_id", "study_id", "created_at"],
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION clinfuse_reviews_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{MESSAGE}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER reviews_append_only BEFORE UPDATE OR DELETE ON reviews "
            "FOR EACH ROW EXECUTE FUNCTION clinfuse_reviews_append_only()"
        )
        op.execute(
            "CREATE TRIGGER reviews_no_truncate BEFORE TRUNCATE ON reviews "
            "FOR EACH STATEMENT EXECUTE FUNCTION clinfuse_reviews_append_only()"
        )
    elif op.get_bind().dialect.name == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER reviews_no_{event.lower()} BEFORE {event} ON reviews "
                f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER reviews_no_truncate ON reviews")
        op.execute("DROP TRIGGER reviews_append_only ON reviews")
        op.execute("DROP FUNCTION clinfuse_reviews_append_only()")
    elif op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER reviews_no_update")
        op.execute("DROP TRIGGER reviews_no_delete")
    op.drop_index(op.f("ix_reviews_run_id_study_id_created_at"), table_name="reviews")
