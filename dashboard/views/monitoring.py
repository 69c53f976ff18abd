"""Monitoring: the run's score distributions and positive rates per label against the
validation data saved with the model, and how often reviewers agreed with the model."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st
from session import as_written, current

from clinfuse.review import review_agreement, score_distributions


def histogram_frame(entry: dict[str, Any], edges: list[float]) -> pd.DataFrame:
    """Run and validation histograms of one label as fractions, indexed by bin centre."""
    centres = [round((a + b) / 2, 3) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    frame = pd.DataFrame(index=pd.Index(centres, name="probability"))
    for name, counts in (("this run", entry.get("counts")), ("validation", entry.get("reference"))):
        if counts:
            total = sum(counts) or 1
            frame[name] = [c / total for c in counts]
    return frame


def summary_frame(labels: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row a label: positive rates of the run and of validation, and the shift."""
    rows = []
    for label, entry in labels.items():
        rows.append(
            {
                "label": label,
                "positive rate (run)": entry.get("positive_rate"),
                "positive rate (validation)": entry.get("reference_positive_rate"),
                "shift (PSI)": entry.get("psi"),
                "shift": entry.get("shift") or "no reference",
                "studies": entry.get("n"),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    """The monitoring page."""
    session = current()
    st.title("Monitoring")
    st.caption(
        f"Run #{session.run_id} · model {session.run['model_version']}. Each label's scores in "
        "this run next to the model's validation data: a major shift (population stability "
        "index ≥ 0.25) means the studies differ from those the model was checked on."
    )
    found = score_distributions(session.store, session.run_id)
    labels: dict[str, dict[str, Any]] = found.get("labels", {})
    if not labels:
        st.info("No prediction in this run yet.")
        return
    if not found.get("has_reference", True):
        st.warning("The model has no saved validation distribution: only this run is shown.")
    summary = summary_frame(labels)
    st.dataframe(
        summary,
        hide_index=True,
        width="stretch",
        column_config={
            "positive rate (run)": st.column_config.NumberColumn(format="percent"),
            "positive rate (validation)": st.column_config.NumberColumn(format="percent"),
            "shift (PSI)": st.column_config.NumberColumn(format="%.3f"),
        },
    )
    shifted = summary[summary["shift"] == "major"]["label"].tolist()
    if shifted:
        st.warning(f"Score distribution shifted for: {as_written(', '.join(shifted))}.")
    edges = list(found.get("bins", [i / 20 for i in range(21)]))
    columns = st.columns(2)
    for i, (label, entry) in enumerate(labels.items()):
        with columns[i % 2]:
            st.markdown(f"**{as_written(label)}**")
            st.bar_chart(histogram_frame(entry, edges), stack=False, height=180, y_label="fraction")

    st.subheader("Reviewer agreement with the model")
    agreement = review_agreement(session.store, session.run_id)
    if agreement.empty:
        st.caption("No review in this run yet.")
    else:
        st.dataframe(agreement, hide_index=True, width="stretch")


main()
