"""Clinician review of a run's predictions, as plain data the dashboard lays out.

    frame, total = worklist(store, WorklistQuery(run_id, label="effusion", uncertain=0.1))
    view = study_view(store, run_id, study_id)
    save_review(store, run_id, study_id, "dr.lee", "corrected", {"effusion": 0}, "no fluid")
    export_reviewed_manifest(store, run_id, "reviewed.csv")  # labels for the next training

No patient name, id or birth date leaves this package: studies carry the store's pseudonym.
"""

from clinfuse.review.export import export_reviewed_manifest, latest_reviews, review_agreement
from clinfuse.review.monitoring import score_distributions
from clinfuse.review.study import (
    ManifestEntry,
    StudyView,
    current_labels,
    manifest_index,
    save_review,
    study_view,
)
from clinfuse.review.worklist import (
    WorklistQuery,
    ordered_ids,
    page_columns,
    page_statement,
    worklist,
)

# Where the dashboard may listen without OIDC login (local single-user mode): this machine.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

__all__ = [
    "LOCAL_HOSTS",
    "ManifestEntry",
    "StudyView",
    "WorklistQuery",
    "current_labels",
    "export_reviewed_manifest",
    "latest_reviews",
    "manifest_index",
    "ordered_ids",
    "page_columns",
    "page_statement",
    "review_agreement",
    "save_review",
    "score_distributions",
    "study_view",
    "worklist",
]
