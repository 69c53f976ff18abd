"""Peer models trained and scored on clinfuse's data layer, for side-by-side benchmarks."""

from clinfuse.peers.training import (
    PeerTraining,
    create_transchex,
    load_transchex,
    train_step,
    train_transchex,
)
from clinfuse.peers.transchex import (
    TranschexClassifier,
    TranschexConfig,
    build_transchex,
    count_parameters,
    write_offline_bert,
)

__all__ = [
    "PeerTraining",
    "TranschexClassifier",
    "TranschexConfig",
    "build_transchex",
    "count_parameters",
    "create_transchex",
    "load_transchex",
    "train_step",
    "train_transchex",
    "write_offline_bert",
]
