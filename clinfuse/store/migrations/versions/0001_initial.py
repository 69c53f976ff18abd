"""The initial store: models, runs, studies, predictions, explanations, failures, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-05-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Study ids sort by code point on PostgreSQL too, whatever the database's locale.
STUDY_ID = sa.String().with_variant(sa.String(collation="C"), "postgresql")
UTC = sa.DateTime(timezone=True)


def _ids(table: str, with_study: bool = True) -> list[sa.SchemaItem]:
    """The id, run_id and study_id columns and their keys, shared by every per-study table."""
    items: list[sa.SchemaItem] = [
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("study_id", STUDY_ID, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f(f"fk_{table}_run_id_runs")),
    ]
    if with_study:
        items.append(
            sa.ForeignKeyConstraint(
                ["run_id", "study_id"],
                ["studies.run_id", "studies.study_id"],
                name=op.f(f"fk_{table}_run_id_study_id_studies"),
            )
        )
    return items


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("validation", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("version", name=op.f("uq_models_version")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_key", sa.String(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("run_key", name=op.f("uq_runs_run_key")),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_runs_model_id_models")),
        sa.CheckConstraint("status IN ('running', 'finished')", name=op.f("ck_runs_status")),
    )
    op.create_table(
        "studies",
        *_ids("studies", with_study=False),
        sa.Column("patient_pseudonym", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("modalities", sa.String(16), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.UniqueConstraint("run_id", "study_id", name=op.f("uq_studies_run_id_study_id")),
        sa.CheckConstraint("status IN ('predicted', 'failed')", name=op.f("ck_studies_status")),
        sa.CheckConstraint(
            "modalities IN ('image+note', 'image', 'note', '')", name=op.f("ck_studies_modalities")
        ),
    )
    op.create_table(
        "predictions",
        *_ids("predictions"),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.UniqueConstraint(
            "run_id", "study_id", "label", name=op.f("uq_predictions_run_id_study_id_label")
        ),
    )
    op.create_index(
        op.f("ix_predictions_run_id_label_probability"),
        "predictions",
        ["run_id", "label", "probability"],
    )
    op.create_table(
        "explanations",
        *_ids("explanations"),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=True),
        sa.UniqueConstraint("run_id", "study_id", name=op.f("uq_explanations_run_id_study_id")),
    )
    op.create_table(
        "failures",
        *_ids("failures"),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.UniqueConstraint("run_id", "study_id", name=op.f("uq_failures_run_id_study_id")),
    )
    op.create_table(
        "reviews",
        *_ids("reviews"),
        sa.Column("reviewer", sa.String(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("labels_before", sa.JSON(), nullable=False),
        sa.Column("labels_after", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.CheckConstraint(
            "verdict IN ('agree', 'disagree', 'corrected')", name=op.f("ck_reviews_verdict")
        ),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
    )


def downgrade() -> None:
    for table in (
        "settings",
        "reviews",
        "failures",
        "explanations",
        "predictions",
        "studies",
        "runs",
        "models",
    ):
        op.drop_table(table)
