"""Batch inference: manifest -> store -> exports, resumable, on one machine or on Ray."""

from clinfuse.inference.pipeline import InferenceSettings, InferenceSummary, run_inference

__all__ = ["InferenceSettings", "InferenceSummary", "run_inference"]
