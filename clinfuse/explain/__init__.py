"""Explanations per study and label: image and note attributions, modality Shapley values,
cross-attention maps (`explain`), kept in an `Explanation`."""

from clinfuse.explain.attribution import explain
from clinfuse.explain.explanation import Explanation

__all__ = ["Explanation", "explain"]
