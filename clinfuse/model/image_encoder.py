"""`ImageEncoder`: a MONAI network cut before its classifier; its feature map becomes tokens.

2D and 3D by `spatial_dims`, any number of input channels. The last feature map
(B, F, *grid) is flattened into a sequence, projected to the fusion width and given a fixed
sinusoidal position code so that fusion can relate a note to *where* something is.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from monai.networks.nets import DenseNet, ResNet, ViT
from safetensors.torch import load_file
from torch import nn

from clinfuse.config import ImageConfig
from clinfuse.errors import ConfigError


def build_backbone(cfg: ImageConfig, spatial_size: tuple[int, ...]) -> tuple[nn.Module, int]:
    """The MONAI trunk without pooling or classifier, and its output feature count."""
    if cfg.backbone == "densenet":
        net = DenseNet(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            out_channels=1,
            init_features=cfg.init_features,
            growth_rate=cfg.growth_rate,
            block_config=cfg.block_config,
            act=("relu", {"inplace": False}),  # captum's hooks need out-of-place activations
        )
        trunk = nn.Sequential(OrderedDict(features=net.features, relu=nn.ReLU()))
        return trunk, net.class_layers.out.in_features
    if cfg.backbone == "resnet":
        net = ResNet(
            block="basic",
            layers=list(cfg.layers),
            block_inplanes=list(cfg.block_inplanes),
            spatial_dims=cfg.spatial_dims,
            n_input_channels=cfg.in_channels,
            conv1_t_stride=2,
            feed_forward=False,
            act=("relu", {"inplace": False}),
        )
        names = ("conv1", "bn1", "act", "maxpool", "layer1", "layer2", "layer3", "layer4")
        trunk = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
        return trunk, cfg.block_inplanes[-1]
    if cfg.backbone == "vit":
        return _ViTTrunk(cfg, spatial_size), cfg.vit_hidden
    raise ConfigError("model.image.backbone", f"unknown backbone {cfg.backbone!r}")


class _ViTTrunk(nn.Module):
    """MONAI ViT tokens (B, N, hidden) reshaped to a feature map (B, hidden, *grid)."""

    def __init__(self, cfg: ImageConfig, spatial_size: tuple[int, ...]) -> None:
        super().__init__()
        if any(s % cfg.patch_size for s in spatial_size):
            raise ConfigError(
                "model.image.patch_size",
                f"{cfg.patch_size} does not divide the image size {spatial_size}",
            )
        self.grid = tuple(s // cfg.patch_size for s in spatial_size)
        self.vit = ViT(
            in_channels=cfg.in_channels,
            img_size=spatial_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.vit_hidden,
            mlp_dim=cfg.vit_hidden * 4,
            num_layers=cfg.vit_layers,
            num_heads=cfg.vit_heads,
            spatial_dims=cfg.spatial_dims,
            classification=False,
        )
        for block in self.vit.blocks:  # MONAI builds this norm even without cross-attention
            if not block.with_cross_attention:
                block.norm_cross_attn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.vit(x)  # (B, N, hidden)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)  # (B, hidden, *grid)


def sinusoidal_positions(grid: tuple[int, ...], width: int) -> torch.Tensor:
    """(prod(grid), width) fixed position code: sin/cos per axis, zero-padded to `width`."""
    per_axis = width // (2 * len(grid))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(per_axis) / max(per_axis, 1))
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij")
    parts = []
    for coord in axes:
        angles = coord.reshape(-1, 1) * freqs  # (N, per_axis)
        parts += [angles.sin(), angles.cos()]
    code = torch.cat(parts, dim=1)  # (N, 2 * ndim * per_axis)
    return nn.functional.pad(code, (0, width - code.shape[1]))


class ImageEncoder(nn.Module):
    """Image (B, C, *spatial) -> tokens (B, Ni, D)."""

    def __init__(self, cfg: ImageConfig, spatial_size: tuple[int, ...], width: int) -> None:
        super().__init__()
        if len(spatial_size) != cfg.spatial_dims:
            raise ConfigError(
                "model.preprocess.spatial_size",
                f"{tuple(spatial_size)} has {len(spatial_size)} axes but "
                f"image.spatial_dims is {cfg.spatial_dims}",
            )
        self.backbone, features = build_backbone(cfg, tuple(spatial_size))
        if cfg.pretrained:
            load_backbone_weights(self.backbone, cfg.pretrained)
        self.project = nn.Linear(features, width)
        self.grid, self.finer_stages = _probe(self.backbone, cfg.in_channels, spatial_size)
        self.register_buffer("positions", sinusoidal_positions(self.grid, width), persistent=False)

    @property
    def num_tokens(self) -> int:
        return int(math.prod(self.grid))

    def feature_map(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, F, *grid): the last feature map (Grad-CAM's layer)."""
        return self.backbone(image)

    def cam_layers(self) -> list[nn.Module]:
        """Grad-CAM's layers: the last feature map, then (CNN trunks) the last stages at twice
        and four times its resolution, whose maps sharpen the coarse one
        (`clinfuse.explain.gradcam_maps`)."""
        stages = dict(_stages(self.backbone))
        return [self.backbone] + [stages[name] for name in self.finer_stages]

    def channels_last(self) -> ImageEncoder:
        """Lay the trunk's convolution weights out channels-last (NHWC, NDHWC in 3D), the layout
        oneDNN's CPU kernels run fastest; outputs are unchanged up to float rounding
        (`pipelines/bench_model.py` measures each model with and without it and
        `clinfuse.allocator.reuse_freed_memory`). `load_checkpoint` applies it; training keeps
        the default layout (DistributedDataParallel's gradient buckets expect it)."""
        layout = torch.channels_last if len(self.grid) == 2 else torch.channels_last_3d
        self.backbone.to(memory_format=layout)  # only 4D / 5D tensors change layout
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.feature_map(image)  # (B, F, *grid)
        tokens = features.flatten(2).transpose(1, 2)  # (B, Ni, F)
        return self.project(tokens) + self.positions  # (B, Ni, D)


def _stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The trunk's top-level stages in order (a DenseNet's are inside its `features`)."""
    features = getattr(backbone, "features", None)
    return list((features if isinstance(features, nn.Sequential) else backbone).named_children())


# Grad-CAM weighs the last map by those of the stages at these multiples of its grid: on the
# sample data the 4x stage on top of the 2x one more than doubled the relevance mass inside the
# small lesions' masks at the same pointing game; the 8x stage (a DenseNet's stem) cost pointing
# and mask AUROC.
FINER_FACTORS = (2, 4)


def _probe(
    backbone: nn.Module, in_channels: int, spatial_size: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """One forward of a blank image: the output grid, and for each of `FINER_FACTORS` the name
    of the last stage whose output grid is that many times it on every axis (none for a factor
    no stage has, e.g. in a ViT)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _inputs: object, out: object) -> None:
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[2:])

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in _stages(backbone)]
    try:
        with torch.no_grad():
            grid = tuple(backbone.eval()(torch.zeros(1, in_channels, *spatial_size)).shape[2:])
    finally:
        for hook in hooks:
            hook.remove()
        backbone.train()
    finer = []
    for factor in FINER_FACTORS:
        names = [name for name, shape in shapes.items() if shape == tuple(factor * g for g in grid)]
        finer += names[-1:]
    return grid, tuple(finer)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a local safetensors file into the backbone."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.image.pretrained", f"{path} is not a file")
    if path.suffix != ".safetensors":  # a pickled file a user hands over is never unpickled
        raise ConfigError(
            "model.image.pretrained",
            f"{path} is not a .safetensors file",
            hint="convert it once where you trust it: "
            "safetensors.torch.save_file(state_dict, 'backbone.safetensors')",
        )
    state = load_file(str(path))
    # Module names follow MONAI's (features.*, conv1/layer1.*, vit.*), so a MONAI network's
    # own state_dict loads as is; its classifier keys are ignored.
    if isinstance(backbone, _ViTTrunk) and not any(k.startswith("vit.") for k in state):
        state = {f"vit.{k}": v for k, v in state.items()}
    own = backbone.state_dict()
    needed = [key for key in own if not key.endswith("num_batches_tracked")]  # a counter
    missing = [key for key in needed if key not in state]
    if missing:  # strict=False below would leave them as initialised, without a word
        raise ConfigError(
            "model.image.pretrained",
            f"{path} lacks {len(missing)} of the {len(needed)} weights of the "
            f"{type(backbone).__name__} backbone (first: {', '.join(missing[:3])})",
            hint="save a MONAI network of this architecture's own state_dict (its names: "
            "features.* for DenseNet, conv1/layer1.* for ResNet, vit.* for ViT) with the "
            "model.image settings that built it",
        )
    for key, value in own.items():
        if key in state and state[key].shape != value.shape:
            raise ConfigError(
                "model.image.pretrained",
                f"{path}: {key} is {tuple(state[key].shape)} where this backbone's is "
                f"{tuple(value.shape)}",
                hint="set model.image (block_config, growth_rate, init_features, layers, "
                "in_channels, ...) to the network the file was saved from",
            )
    backbone.load_state_dict(state, strict=False)  # the classifier's keys are left out
