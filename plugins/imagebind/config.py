"""ImageBind configurations: the released `huge` model and small ones for tests and benchmarks.

    ImageBindConfig.named("huge")                         # upstream's imagebind_huge()
    ImageBindConfig.named("tiny", num_cls_tokens={"vision": 4}, head_mode="all")
    ImageBindConfig.named("huge_w3d")                     # ImageBind-LLM's copy: + point clouds

One `ModalityConfig` per modality inside one `ImageBindConfig`. Upstream hard-codes one CLS token
per modality (none for text); here any count is a legal config, and the token sites change it on a
built model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from surgery.errors import ModelConfigError as ConfigError  # the core's classes, under this plugin's names
from surgery.errors import ModelInputError as InputError

MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")  # upstream ImageBind's six
POINT = "point"  # ImageBind-LLM's seventh (`imagebind_w3D.pth`): point clouds through Point-BERT
ALL_MODALITIES = (*MODALITIES, POINT)
CLS_MODALITIES = ("vision", "audio", "depth", "thermal", "imu")  # CLS tokens in the preprocessor; text has none
HEAD_MODALITIES = (*CLS_MODALITIES, POINT)  # heads that read CLS tokens (first | mean | all): all but text
HEAD_MODES = ("first", "mean", "all")


@dataclass
class ModalityConfig:
    """One modality's encoder: preprocessor input, trunk and head."""

    embed_dim: int
    num_blocks: int
    num_heads: int
    pre_transformer_ln: bool = False  # vision only: LayerNorm(eps 1e-6) before the blocks
    add_bias_kv: bool = False  # audio, depth, thermal, imu: a learned extra key/value per block
    drop_path: float = 0.0  # the last block's rate; linear from 0 over the blocks (upstream)
    num_cls_tokens: int = 1
    head_mode: str = "first"  # how the head reads the CLS tokens: first | mean | all
    # the input the preprocessor is built for (its positional embedding's extent)
    in_chans: int = 1
    input_size: tuple[int, ...] = ()  # vision (T, H, W); audio (mel bins, frames); depth/thermal (H, W); imu (length,)
    kernel_size: tuple[int, ...] = ()  # patch kernel (vision 3-D, others 2-D; imu (k,) along time)
    stride: tuple[int, ...] | None = None  # None: same as the kernel (audio overlaps: stride 10 < kernel 16)
    # text only
    vocab_size: int = 0
    context_length: int = 0
    head_dropout: float = 0.0  # imu, point: Dropout(0.5) between the head's LayerNorm and projection
    logit_scale: float | None = None  # fixed scale after normalising (None: none; text's is learned)
    # point only (Point-BERT); input_size is (points per cloud,), what the loaders resample to
    num_groups: int = 0  # farthest-point-sampled centres, one token each (upstream 512)
    group_size: int = 0  # nearest neighbours per centre (upstream 32)
    group_dim: int = 0  # the mini-PointNet's output per group, before reduce_dim (upstream encoder_dims 256)
    point_dim: int = 0  # pc_projection's output, the point head's input (upstream 512)
    fps_seed: int | None = None  # None: sampling starts at each cloud's point 0; an int: a seeded random start


@dataclass
class ImageBindConfig:
    """The whole model: the modalities it has, each one's encoder, the joint embedding width."""

    out_embed_dim: int
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    text_logit_scale_init: float = 1 / 0.07  # learnable, clipped at max_logit_scale (upstream)
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in ALL_MODALITIES]
        if unknown:
            raise ConfigError(f"unknown modalities {unknown}; ImageBind has {', '.join(ALL_MODALITIES)}")
        if not self.modalities:
            raise ConfigError(f"an ImageBind config needs at least one of {', '.join(ALL_MODALITIES)}")
        for name, m in self.modalities.items():
            if m.embed_dim % m.num_heads:
                raise ConfigError(f"{name}: embed_dim {m.embed_dim} is not divisible by num_heads {m.num_heads}")
            check_head_mode(m.head_mode, name)
            if name == "text" and m.num_cls_tokens:
                raise ConfigError(TEXT_CLS_REASON)
            if isinstance(m.num_cls_tokens, bool) or not isinstance(m.num_cls_tokens, int) or m.num_cls_tokens < 0:
                raise ConfigError(f"{name}: num_cls_tokens must be an integer >= 0, got {m.num_cls_tokens!r}")
            if m.num_cls_tokens == 0 and m.head_mode != "first":
                raise ConfigError(f"{name}: head_mode {m.head_mode!r} reads the CLS tokens and there are none; "
                                  f"use num_cls_tokens >= 1 or head_mode 'first'")
            if name == POINT:
                check_point_config(m)

    @property
    def num_cls_tokens(self) -> dict[str, int]:
        return {name: m.num_cls_tokens for name, m in self.modalities.items()}

    @classmethod
    def named(cls, name: str = "huge", *, num_cls_tokens: Mapping[str, int] | None = None,
              head_mode: str | Mapping[str, str] | None = None,
              modalities: tuple[str, ...] | None = None) -> "ImageBindConfig":
        """A copy of a named config with per-modality overrides: CLS counts, head modes, a subset
        of the modalities (keeping upstream's key layout for those)."""
        if name not in CONFIGS:
            raise ConfigError(f"unknown ImageBind config {name!r}; known: {', '.join(CONFIGS)}")
        config = copy.deepcopy(CONFIGS[name])
        if modalities is not None:
            unknown = [m for m in modalities if m not in config.modalities]
            if unknown:
                raise ConfigError(f"config {name!r} has no modality {unknown}; it has {', '.join(config.modalities)}")
            config.modalities = {m: config.modalities[m] for m in config.modalities if m in modalities}
        for modality, count in (num_cls_tokens or {}).items():
            _modality(config, modality).num_cls_tokens = count
        if head_mode is not None:
            modes = head_mode if isinstance(head_mode, Mapping) else {m: head_mode for m in config.modalities
                                                                    if m in HEAD_MODALITIES}
            for modality, mode in modes.items():
                if modality == "text":
                    raise ConfigError("text has no CLS-token head mode: its head reads the EOT token")
                _modality(config, modality).head_mode = mode
        config.__post_init__()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TEXT_CLS_REASON = ("text cannot have CLS tokens: its trunk uses a causal attention mask, under which a CLS "
                   "token placed first would see no text at all, and its head reads the end-of-text token "
                   "(upstream: 'Masking + CLS token isn't implemented')")


POINT_CLS_REASON = ("the point feature is [CLS token, max over groups] (pc_projection reads both halves), "
                    "so point needs at least one CLS token")


def check_point_config(m: ModalityConfig) -> None:
    if m.num_cls_tokens < 1:
        raise ConfigError(f"point: num_cls_tokens must be >= 1: {POINT_CLS_REASON}")
    sizes = {"num_groups": m.num_groups, "group_size": m.group_size, "group_dim": m.group_dim,
             "point_dim": m.point_dim}
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ConfigError(f"point: {', '.join(f'{k}={v!r}' for k, v in bad.items())}; each must be an integer >= 1")
    if len(m.input_size) != 1 or m.input_size[0] < max(m.num_groups, m.group_size):
        raise ConfigError(f"point: input_size must be (points per cloud,) with at least num_groups "
                          f"({m.num_groups}) and group_size ({m.group_size}) points, got {m.input_size}")
    if m.fps_seed is not None and (isinstance(m.fps_seed, bool) or not isinstance(m.fps_seed, int)):
        raise ConfigError(f"point: fps_seed must be None (start at point 0) or an integer seed, got {m.fps_seed!r}")


def check_head_mode(mode: str, modality: str = "") -> str:
    if mode not in HEAD_MODES:
        where = f"{modality}: " if modality else ""
        raise ConfigError(f"{where}unknown head mode {mode!r}; allowed: 'first' (upstream: CLS token 0), "
                          f"'mean' (the mean of the CLS tokens), 'all' (one embedding per CLS token)")
    return mode


def _modality(config: ImageBindConfig, modality: str) -> ModalityConfig:
    if modality not in config.modalities:
        raise ConfigError(f"no modality {modality!r} in this config; it has {', '.join(config.modalities)}")
    return config.modalities[modality]


def _huge() -> ImageBindConfig:
    return ImageBindConfig(out_embed_dim=1024, modalities={
        "vision": ModalityConfig(1280, 32, 16, pre_transformer_ln=True, in_chans=3, input_size=(2, 224, 224),
                                 kernel_size=(2, 14, 14)),
        "text": ModalityConfig(1024, 24, 16, num_cls_tokens=0, vocab_size=49408, context_length=77),
        "audio": ModalityConfig(768, 12, 12, add_bias_kv=True, drop_path=0.1, input_size=(128, 204),
                                kernel_size=(16, 16), stride=(10, 10), logit_scale=20.0),
        "depth": ModalityConfig(384, 12, 8, add_bias_kv=True, input_size=(224, 224), kernel_size=(16, 16),
                                logit_scale=5.0),
        "thermal": ModalityConfig(768, 12, 12, add_bias_kv=True, input_size=(224, 224), kernel_size=(16, 16),
                                  logit_scale=10.0),
        "imu": ModalityConfig(512, 6, 8, add_bias_kv=True, drop_path=0.7, in_chans=6, input_size=(2000,),
                              kernel_size=(8,), head_dropout=0.5, logit_scale=5.0),
    })


def _point(width: int, blocks: int, heads: int, points: int, groups: int, group_size: int, group_dim: int,
           point_dim: int, drop_path: float) -> ModalityConfig:
    """The Point-BERT encoder: `width` = trans_dim; the head's dropout and fixed scale 1 are upstream's."""
    return ModalityConfig(width, blocks, heads, drop_path=drop_path, in_chans=3, input_size=(points,),
                          num_groups=groups, group_size=group_size, group_dim=group_dim, point_dim=point_dim,
                          head_dropout=0.5, logit_scale=1.0)


def _with_point(config: ImageBindConfig, point: ModalityConfig) -> ImageBindConfig:
    with_point = copy.deepcopy(config)
    with_point.modalities[POINT] = point
    with_point.__post_init__()
    return with_point


def _small(width: int, blocks: int, heads: int, out: int, image: int, vocab: int, context: int) -> ImageBindConfig:
    """Upstream's layout at a smaller scale: same stems, kernels and options, fewer pixels.

    Vision keeps the (2, 14, 14) Conv3d; audio keeps kernel 16 / stride 10 (a non-square grid, as
    upstream's 12 x 19); imu keeps 6 channels and kernel 8 (48 features per patch)."""
    return ImageBindConfig(out_embed_dim=out, modalities={
        "vision": ModalityConfig(width, blocks, heads, pre_transformer_ln=True, in_chans=3,
                                 input_size=(2, image, image), kernel_size=(2, 14, 14)),
        "text": ModalityConfig(width, blocks, heads, num_cls_tokens=0, vocab_size=vocab, context_length=context),
        "audio": ModalityConfig(width, blocks, heads, add_bias_kv=True, drop_path=0.1, input_size=(36, 46),
                                kernel_size=(16, 16), stride=(10, 10), logit_scale=20.0),
        "depth": ModalityConfig(width // 2, blocks, heads, add_bias_kv=True, input_size=(32, 32),
                                kernel_size=(8, 8), logit_scale=5.0),
        "thermal": ModalityConfig(width, blocks, heads, add_bias_kv=True, input_size=(32, 32), kernel_size=(8, 8),
                                  logit_scale=10.0),
        "imu": ModalityConfig(width, blocks, heads, add_bias_kv=True, drop_path=0.7, in_chans=6, input_size=(64,),
                              kernel_size=(8,), head_dropout=0.5, logit_scale=5.0),
    })


CONFIGS: dict[str, ImageBindConfig] = {
    "huge": _huge(),
    # tests: every modality in milliseconds; vision 56 px = a 4 x 4 grid, audio a 3 x 4 grid
    "tiny": _small(width=32, blocks=2, heads=2, out=24, image=56, vocab=520, context=16),
    # benchmarks: a quick run of the whole grid
    "small": _small(width=256, blocks=4, heads=4, out=128, image=112, vocab=49408, context=77),
}
# ImageBind-LLM's copy (`imagebind_w3D.pth`): the same six and `point`; upstream's yaml: trans_dim 384,
# depth 12, 6 heads, drop path 0.1, 512 groups of 32 of 8192 points, encoder_dims 256; pc_projection 768 x 512
CONFIGS["huge_w3d"] = _with_point(CONFIGS["huge"], _point(384, 12, 6, points=8192, groups=512, group_size=32,
                                                          group_dim=256, point_dim=512, drop_path=0.1))
CONFIGS["tiny_w3d"] = _with_point(CONFIGS["tiny"], _point(32, 2, 2, points=64, groups=8, group_size=8,
                                                          group_dim=16, point_dim=24, drop_path=0.1))
CONFIGS["small_w3d"] = _with_point(CONFIGS["small"], _point(256, 4, 4, points=2048, groups=128, group_size=32,
                                                            group_dim=128, point_dim=256, drop_path=0.1))


__all__ = ["MODALITIES", "POINT", "ALL_MODALITIES", "CLS_MODALITIES", "HEAD_MODALITIES", "HEAD_MODES", "ConfigError",
           "InputError", "ModalityConfig", "ImageBindConfig", "CONFIGS", "TEXT_CLS_REASON", "POINT_CLS_REASON",
           "check_head_mode", "check_point_config"]
