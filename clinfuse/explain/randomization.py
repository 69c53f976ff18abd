"""Cascading randomisation (Adebayo et al., 2018): the model's weights re-initialised stage by
stage, from the heads back towards the input, on a copy; an explanation that does not change
as the model is destroyed did not depend on what the model learned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from clinfuse.model.model import FusionModel


# -- stages ----------------------------------------------------------------
def _blocks(module: torch.nn.Module, at_least: int = 4) -> list[torch.nn.Module]:
    """The module's parameterised parts in forward order, containers (modules owning no
    parameter themselves) opened until there are `at_least` or none is left to open."""
    blocks = [module]
    while len(blocks) < at_least:
        for i, block in enumerate(blocks):
            children = [c for c in block.children() if any(True for _ in c.parameters())]
            if children and not any(True for _ in block.parameters(recurse=False)):
                blocks[i : i + 1] = children
                break
        else:
            return blocks
    return blocks


def randomization_stages(model: FusionModel) -> list[tuple[str, list[torch.nn.Module]]]:
    """The stages of a cascading randomisation, from the heads back towards the input; a stage
    lists modules and loose parameters (label queries, missing-side tokens)."""
    pool = [
        model.pool,
        getattr(model, "label_attention", None),
        getattr(model, "label_queries", None),
    ]
    missing = [model.missing_image, model.missing_text]
    stages = [("head", [model.head, model.side_heads, model.prior])]
    if model.fusion is not None:
        stages += [("pool", pool), ("fusion", [model.fusion, *missing])]
    else:
        stages += [("pool", pool + missing)]
    if model.text_encoder is not None:
        stages.append(("note encoder", [model.text_encoder]))
    if model.image_encoder is not None:
        blocks = _blocks(model.image_encoder.backbone)
        half = len(blocks) // 2
        stages.append(("image projection", [model.image_encoder.project]))
        stages.append(("image backbone top", blocks[half:]))
        stages.append(("image backbone all", blocks[:half]))
    return [(name, [p for p in parts if p is not None]) for name, parts in stages]


def reinitialise(part: torch.nn.Module | torch.nn.Parameter) -> None:
    """Re-draw a module's parameters with each layer's own initialiser; a module without one
    (and a loose parameter) gets normal(0, 1/sqrt(fan_in)) weights and zero biases."""
    modules = [] if isinstance(part, torch.nn.Parameter) else list(part.modules())
    loose = [part] if isinstance(part, torch.nn.Parameter) else []
    for module in modules:
        reset = getattr(module, "reset_parameters", None)
        reset = reset or getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()
        else:
            loose += list(module.parameters(recurse=False))
    with torch.no_grad():
        for parameter in loose:
            if parameter.dim() > 1:
                parameter.normal_(std=parameter.shape[-1] ** -0.5)
            else:
                parameter.zero_()


def cascading_randomization(model: FusionModel, seed: int = 0) -> Iterator[tuple[str, FusionModel]]:
    """Yield (stage, copy of the model with that stage and all before it re-initialised). The
    model passed in is never changed."""
    randomized = copy.deepcopy(model).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for stage, parts in randomization_stages(randomized):
            for part in parts:
                reinitialise(part)
            yield stage, randomized
