"""Typed configuration: one pydantic model per component, round-tripping to JSON/YAML.

An unknown or mistyped key fails when the config loads, as a `ConfigError` naming the key
(`model.fusion.widht: unknown key`), never deep inside a constructor. `key=value` overrides
from the command line reach any field by its dotted path.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clinfuse.errors import ConfigError

FusionMode = Literal["cross_attention", "late", "image_only", "text_only"]
C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base of every config: unknown keys are errors, fields are validated on assignment."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false is not a number: pydantic would read it as 1/0 (train.epochs=true)."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(annotation)) or {annotation}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError(f"{str(value).lower()} is not a number")
        return value


# a network's stages: one or more positive counts (blocks, layers, channels)
Stages = Annotated[tuple[Annotated[int, Field(strict=True, gt=0)], ...], Field(min_length=1)]


def _check_heads(width_key: str, width: int, heads_key: str, heads: int) -> None:
    """Attention splits a width evenly over its heads."""
    if width % heads:
        raise ValueError(f"{width_key} ({width}) must be a multiple of {heads_key} ({heads})")


class ImageConfig(Config):
    """A MONAI image backbone cut before its classifier; its last feature map becomes tokens."""

    backbone: Literal["densenet", "resnet", "vit"] = "densenet"
    spatial_dims: Literal[2, 3] = 2
    in_channels: int = Field(1, ge=1)
    # densenet: init_features, growth_rate, block_config (DenseNet121 = 64, 32, (6, 12, 24, 16))
    init_features: int = Field(16, ge=1)
    growth_rate: int = Field(16, ge=1)
    block_config: Stages = (2, 2, 2)
    # resnet: layers and block_inplanes (ResNet18 = (2, 2, 2, 2), (64, 128, 256, 512))
    layers: Stages = (1, 1, 1, 1)
    block_inplanes: Stages = (16, 32, 64, 128)
    # vit: patch size, width, depth, heads
    patch_size: int = Field(16, ge=1)
    vit_hidden: int = Field(128, ge=1)
    vit_layers: int = Field(2, ge=1)
    vit_heads: int = Field(4, ge=1)
    pretrained: str | None = None  # a local .safetensors file of the backbone's weights

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ImageConfig:
        if self.backbone == "vit":
            _check_heads("vit_hidden", self.vit_hidden, "vit_heads", self.vit_heads)
        return self


class TextConfig(Config):
    """A transformers encoder: a local folder / hub name, or built in memory (the default)."""

    pretrained: str | None = None  # folder or hub name of a BERT-family encoder + tokenizer
    vocab_size: int = Field(2000, ge=1)  # for the WordPiece tokenizer trained on the notes
    # a whole word enters that vocabulary only when the notes of at least this many patients
    # hold it, so a name, record number or rare age stays out of the saved tokenizer (it is
    # still read, spelled in pieces); 1 = every word, as before
    min_word_patients: int = Field(5, ge=1)
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(128, ge=1)
    max_length: int = Field(128, ge=8)  # tokens, including [CLS] and [SEP]
    long_notes: Literal["truncate", "chunk"] = "truncate"
    max_chunks: int = Field(4, ge=1)  # with long_notes=chunk: at most this many windows
    # training only: this share of each note's word pieces is replaced by [MASK] (or [UNK]),
    # so the encoder cannot memorise whole notes; 0 = off
    token_dropout: float = Field(0.1, ge=0, lt=1)
    # before the supervised run, passes of masked-language-model pretraining of the note
    # encoder on the training notes (offline; 0 = none; BERT encoders only)
    mlm_epochs: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextConfig:
        if self.pretrained is None:  # a pretrained encoder brings its own
            _check_heads("hidden", self.hidden, "heads", self.heads)
        return self


class FusionConfig(Config):
    """How the two sides meet: the mode and the cross-attention stack's shape."""

    mode: FusionMode = "cross_attention"
    width: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # per study, training only: drop one side with this chance
    modality_dropout: float = Field(0.15, ge=0, le=1)
    # how each side's tokens become the head's input: their mean, or per label a learned query
    # attending over them (each label picks out its own evidence)
    pooling: Literal["mean", "label_attention"] = "mean"
    # weight of the per-side auxiliary loss (training only): a head on each encoder's own
    # tokens learns every label from that side alone, so neither encoder is left idle while the
    # other fits the easy labels (cross_attention and late only; 0 = no side heads)
    side_loss: float = Field(1.0, ge=0)
    # with side heads, what the fused head answers: the logit itself ("head"), or a correction
    # to the naive-Bayes sum of the side heads, image + note - prior ("naive_bayes"): the sides
    # carry what each knows alone, the fused tokens only what they know together
    combine: Literal["head", "naive_bayes"] = "head"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FusionConfig:
        if self.mode == "cross_attention" or self.pooling == "label_attention":
            _check_heads("width", self.width, "heads", self.heads)
        return self


class PreprocessConfig(Config):
    """The preprocessing spec; saved in the checkpoint so inference never restates it."""

    spatial_size: tuple[int, ...] = (128, 128)  # (H, W) or (D, H, W)
    fit: Literal["pad", "stretch"] = "pad"  # keep aspect ratio and pad, or resize every axis
    window: Literal["file", "percentile"] = "file"  # the file's VOI window, else percentiles
    normalize: tuple[float, float] = (0.5, 0.25)  # (mean, std) after windowing to [0, 1]

    @model_validator(mode="after")
    def _sizes(self) -> PreprocessConfig:
        if len(self.spatial_size) not in (2, 3) or min(self.spatial_size) < 8:
            raise ValueError("spatial_size is (H, W) or (D, H, W), each at least 8 pixels")
        if self.normalize[1] <= 0:
            raise ValueError("normalize is (mean, std) with std > 0")
        return self


class ModelConfig(Config):
    """Everything needed to build the model (not its weights)."""

    name: str = "custom"
    labels: tuple[str, ...] = ()
    image: ImageConfig = ImageConfig()
    text: TextConfig = TextConfig()
    fusion: FusionConfig = FusionConfig()
    preprocess: PreprocessConfig = PreprocessConfig()


def parse_config(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Validate a dict into `cls`; the first problem becomes a `ConfigError` naming its key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        if error["type"] == "extra_forbidden":
            raise ConfigError(key, "unknown key", hint=_known_keys_hint(cls, error["loc"])) from exc
        hint = ""
        given = error.get("input")
        if error["type"] in ("tuple_type", "list_type") and isinstance(given, (str, int, float)):
            hint = f"give a list in brackets, [{given}]"  # data.labels=[copd], labels: [copd]
        raise ConfigError(key, error["msg"].removeprefix("Value error, "), hint=hint) from exc


# Keys added with a default that changes the result, and the value meaning "as before".
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "TrainConfig": {"evidence_ridge": None},
    "TextConfig": {"min_word_patients": 1},
}


def _with_legacy_defaults(cls: type[Config], saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the `LEGACY_DEFAULTS` of `cls` and of every config section nested in it
    (`ModelConfig` holds `TextConfig` as "text") filled in where absent: settings whose default
    changed what clinfuse does meant the old behaviour when a folder predates them."""
    found = {**LEGACY_DEFAULTS.get(cls.__name__, {}), **saved}
    for name, spec in cls.model_fields.items():
        section = spec.annotation
        if isinstance(section, type) and issubclass(section, Config):
            if isinstance(found.get(name), dict):
                found[name] = _with_legacy_defaults(section, found[name])
    return found


def as_current(cls: type[Config], saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """A config section saved by an earlier clinfuse, with today's defaults for the keys it
    predates (so it compares equal to the same settings given today); as saved when it no
    longer validates (a key since removed or renamed). A new setting whose default changes the
    result is read as its old behaviour when absent (`LEGACY_DEFAULTS`)."""
    if saved is None:
        return None
    saved = _with_legacy_defaults(cls, saved)
    try:
        return cls.model_validate(saved).model_dump(mode="json")
    except ValidationError:
        return saved


def _known_keys_hint(cls: type[Config], loc: tuple[Any, ...]) -> str:
    model: Any = cls
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return ""
        model = field.annotation
    return f"known keys here: {', '.join(model.model_fields)}"


class _RepeatedKey(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently: a second `train:` section would drop the first's settings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # a complex key: the safe loader refuses it as YAML, naming the line
            if key in seen:
                raise _RepeatedKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file's mapping as plain data, not yet validated; a `ConfigError`
    naming the file for one that cannot be read, is not UTF-8, is not YAML, repeats a key or
    does not hold a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        problem = f"{path}: is not UTF-8 text (byte {exc.start})"
        raise ConfigError("--config", problem, hint="save it as UTF-8") from exc
    except OSError as exc:
        raise ConfigError("--config", f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path}: cannot be read as YAML ({exc})") from exc
    except _RepeatedKey as exc:
        raise ConfigError(
            "--config",
            f"{path}: line {exc.line} gives the key {exc.key!r} a second time in its section, "
            "and only one could apply",
            hint="merge the two into one",
        ) from None
    if not isinstance(data, dict):
        problem = f"{path}: a config file must hold a mapping of keys to values"
        raise ConfigError("--config", problem)
    return data


def load_config_file(cls: type[C], path: str | Path, prefix: str = "") -> C:
    """Read a YAML or JSON config file into `cls`."""
    return parse_config(cls, read_config_mapping(path), prefix)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update: nested sections merge, other values replace."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def override_value(key: str, raw: str) -> Any:
    """The value of a `key=value` override, read as YAML (`[a, b]`, `true`, `0.5`); a
    `ConfigError` naming the key for one YAML cannot read, or whose unquoted ` #` would start a
    comment and cut the value short (`/data/run #2` would read as `/data/run`)."""
    if not raw:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(
            key,
            f"cannot read the value {raw!r} ({problem})",
            hint="write it as YAML: a list as [a, b], text with ':' or brackets in quotes",
        ) from exc
    if "#" not in raw:
        return value
    try:  # "#" as an ordinary character: where the two readings differ, a comment was cut off
        as_text = _with_hashes(yaml.safe_load(raw.replace("#", _HASH)))
    except yaml.YAMLError:
        as_text = None  # the value only reads with the comment: it was cut short
    if not _same(as_text, value):
        raise ConfigError(
            key,
            f"the value {raw!r} holds ' #', where YAML starts a comment and would cut it short",
            hint=f"quote the value: {key}='\"{raw}\"'",
        )
    return value


_HASH = "\ue000"  # a private-use character no config value holds


def _same(a: Any, b: Any) -> bool:
    """`a == b` for parsed YAML, a NaN equal to a NaN (`.nan` holds no comment)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _with_hashes(value: Any) -> Any:
    """`value` with `_HASH` turned back into "#" in every string it holds."""
    if isinstance(value, str):
        return value.replace(_HASH, "#")
    if isinstance(value, list):
        return [_with_hashes(v) for v in value]
    if isinstance(value, dict):
        return {_with_hashes(k): _with_hashes(v) for k, v in value.items()}
    return value


def apply_overrides(config: C, overrides: Iterable[str]) -> C:
    """Apply `dotted.key=value` strings (values parsed as YAML) and re-validate; a mapping
    given for a whole section (`train={epochs: 2}`) sets those keys and keeps the others."""
    data = config.model_dump(mode="json")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override must look like key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(key, "unknown key", hint=f"{part!r} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(key, "unknown key", hint=f"known keys here: {', '.join(node)}")
        value = override_value(key, raw)
        if isinstance(value, dict) and isinstance(node[parts[-1]], dict):
            value = merge(node[parts[-1]], value)
        node[parts[-1]] = value
    return parse_config(type(config), data)


def to_json(config: Config) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=False)


class DataConfig(Config):
    """Which labels to learn and how to split patients when the manifest has no `split`."""

    labels: tuple[str, ...] | None = None  # default: every non-reserved manifest column
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    split_seed: int = 0

    @model_validator(mode="after")
    def _leaves_a_train_split(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave patients to train on (< 1)")
        return self


class TrainConfig(Config):
    """The optimisation: budget, schedule, stopping, calibration rule, resources."""

    # Ranges are checked when the config is read, before any data: a value outside them is a
    # ConfigError naming the key, not a traceback mid-run (or an untrained model at the end).
    epochs: int = Field(36, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    # of all steps, linear warm-up, then cosine decay to 0
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    # epochs without a better validation macro AUROC before stopping
    patience: int = Field(10, ge=1)
    class_weighting: Literal["balanced", "none"] = "balanced"  # pos_weight = negatives/positives
    max_pos_weight: float = Field(10.0, ge=1)  # below 1 it would weigh positives down
    # targets 1 - e/2 and e/2 for every head (0: hard targets)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # with fusion.combine=naive_bayes, fit each label's weights of the image's evidence, the
    # note's and the fused correction on validation before the temperature (see
    # `fit_evidence_weights`), with this ridge on the correction's weight (null: keep ones)
    evidence_ridge: float | None = Field(0.05, ge=0)
    threshold_rule: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = Field(0.9, gt=0, le=1)  # with threshold_rule=sensitivity
    augment: bool = True
    # DataLoader worker processes (0: load in the training process)
    workers: int = Field(0, ge=0)
    cache: bool = True  # keep each decoded, resized image in memory after its first epoch
    # steps between resumable checkpoints (and at every epoch end)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    # mixed precision for training's steps on GPU (ignored on CPU); predictions, calibration
    # and metrics are float32 on every device
    amp: bool = True
    # resamples for the validation metrics' confidence intervals
    bootstrap: int = Field(1000, ge=0)


# Train keys that change how fast a run goes, never the model it trains: a run resumes, and a
# finished folder is reused, whatever they are (a run killed for memory goes on with cache=false).
SPEED_ONLY_TRAIN_KEYS = ("workers", "cache", "checkpoint_every")


class RunConfig(Config):
    """One training run: `clinfuse train --config run.yaml key=value ...`."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


def resolve_run_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """YAML file (optional) + `key=value` overrides -> a validated `RunConfig`.

    `model.name` picks a registered architecture whose settings are the defaults that the file
    and the overrides refine.
    """
    from clinfuse.model.registry import DEFAULT_MODEL, architecture

    data: dict[str, Any] = {}
    if path is not None:  # checked once below, on top of its own architecture's settings
        path = Path(path)
        if path.is_dir() and (path / "config.json").is_file():
            path = path / "config.json"  # a model folder: its own settings
        data = read_config_mapping(path)
        if "format_version" in data:  # a model folder's config.json: the run's settings, the
            # labels left to the manifest it is given now
            data = {key: data[key] for key in ("model", "data", "train") if key in data}
            if isinstance(data.get("model"), dict):
                data["model"] = {k: v for k, v in data["model"].items() if k != "labels"}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError("model", "must be a section of keys (name, image, text, fusion, ...)")
    overrides = list(overrides)
    for item in overrides:  # the architecture must be known before its defaults apply
        key, _, value = item.partition("=")
        if key == "model.name":  # read as every override value is (model.name='tiny')
            model = {**model, "name": str(override_value(key, value))}
        elif key == "model":  # a section given whole: model={name: tiny, ...}
            section = override_value(key, value)
            if isinstance(section, dict) and "name" in section:
                model = {**model, "name": str(section["name"])}
    name = model.get("name", DEFAULT_MODEL)
    data["model"] = merge({**architecture(str(name)), "name": name}, model)
    return apply_overrides(parse_config(RunConfig, data), overrides)
