"""The fusion model, its parts, its registry and its checkpoint folder."""

from clinfuse.model.checkpoint import load_checkpoint, save_checkpoint
from clinfuse.model.model import FusionModel, Intermediates
from clinfuse.model.registry import DEFAULT_MODEL, create_model, list_models, model_config

__all__ = [
    "DEFAULT_MODEL",
    "FusionModel",
    "Intermediates",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_config",
    "save_checkpoint",
]
