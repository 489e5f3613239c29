"""ImageBind's modality preprocessors: raw tensors -> token sequences for the trunks.

Upstream's modules, parameter names and numerics (`multimodal_preprocessors.py`), except on purpose:
any number k of CLS tokens works, at any patch grid (upstream asserts `there is 1 CLS token or none`);
the positional grid is interpolated bicubically between any 2-D layouts, per frame; an input that
cannot work is an `InputError` before anything runs; text is encoded without padding (causal
attention makes the result identical).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import InputError, ModalityConfig


class Encoded(NamedTuple):
    """A preprocessor's output: what the trunk and the head need."""

    tokens: torch.Tensor  # [B, N, D], CLS tokens first
    num_cls_tokens: int = 0
    attn_mask: torch.Tensor | None = None  # [N, N] additive (text: causal)
    eot_index: torch.Tensor | None = None  # [B] position of the end-of-text token (text)


def _float_input(x: torch.Tensor, like: torch.Tensor, modality: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{modality}: expected a tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise InputError(f"{modality}: expected a floating-point tensor, got {x.dtype}")
    return x.to(device=like.device, dtype=like.dtype)


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


# -- stems ---------------------------------------------------------------------------------------


class ImageToVideo(nn.Module):
    """(B, C, H, W) -> (B, C, T, H, W): an image becomes a video of `ntimes` identical frames
    (upstream `PadIm2Video(pad_type="repeat")`); a 1-frame video is repeated too."""

    def __init__(self, ntimes: int = 2) -> None:
        super().__init__()
        self.ntimes = ntimes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)  # [B, C, 1, H, W]
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.ntimes, -1, -1)  # [B, C, T, H, W]; the conv reads it once
        return x


class PatchStem(nn.Module):
    """Patchify with a bias-free convolution (`proj`), flatten to tokens, then `norm_layer`."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None) -> None:
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        x = self.proj(x)                  # [B, D, (T,) h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, (T) h w, D]
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x, grid


def _conv_grid(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((s - k) // st + 1 for s, k, st in zip(size, kernel, stride))


# -- positional embeddings -------------------------------------------------------------------------


def interpolate_patch_rows(rows: torch.Tensor, layout: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """Positional rows of a (T, H, W) `layout` resampled to `grid` (bicubic over H, W, each frame
    alone; upstream's interpolation, in float32); unchanged when the grids agree."""
    if tuple(grid) == tuple(layout):
        return rows
    (t0, h0, w0), (t, h, w) = _as_3d(layout), _as_3d(grid)
    dim = rows.shape[-1]
    x = rows.reshape(t0, h0, w0, dim).permute(0, 3, 1, 2)  # [T, D, H0, W0]
    # bicubic is not implemented for every half type on every device: compute in float32, as upstream does for bf16
    x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False)  # [T, D, H, W]
    return x.permute(0, 2, 3, 1).reshape(1, t * h * w, dim).to(rows.dtype)  # [1, T h w, D]


def _as_3d(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (1, *grid) if len(grid) == 2 else tuple(grid)


class PosEmbedding(nn.Module):
    """The learned positional table (upstream `SpatioTemporalPosEmbeddingHelper`): `pos_embed`
    (1, k + patches, D), the k CLS rows first, then the patch rows in (T, H, W) order."""

    def __init__(self, patches_layout: tuple[int, ...], num_cls_tokens: int, dim: int) -> None:
        super().__init__()
        self.patches_layout = tuple(patches_layout)
        self.num_patches = math.prod(patches_layout)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_cls_tokens + self.num_patches, dim))

    def rows(self, num_cls_tokens: int, grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLS rows [1, k, D], patch rows for `grid` [1, n, D])."""
        cls_rows = self.pos_embed[:, :num_cls_tokens]
        patch_rows = self.pos_embed[:, num_cls_tokens:]
        return cls_rows, interpolate_patch_rows(patch_rows, self.patches_layout, grid)


def _cls_parameter(module: nn.Module, num_cls_tokens: int, dim: int) -> None:
    # absent (no key) at zero tokens, as upstream; the token site grows it back from a template
    module.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, dim)) if num_cls_tokens else None


def _prepend_cls(tokens: torch.Tensor, cls_token: torch.Tensor | None, cls_rows: torch.Tensor,
                 patch_rows: torch.Tensor) -> torch.Tensor:
    """[CLS + their rows, patches + theirs]: `cat(cls, x) + pos` of upstream, element for element."""
    B = tokens.shape[0]
    tokens = tokens + patch_rows  # [B, n, D]
    if cls_token is None or cls_token.shape[1] == 0:
        return tokens
    cls = (cls_token + cls_rows).expand(B, -1, -1)  # [B, k, D]
    return torch.cat([cls, tokens], dim=1)  # [B, k + n, D]


# -- vision, audio, depth, thermal ---------------------------------------------------------------------


class PatchPreprocessor(nn.Module):
    """Vision, audio, depth or thermal input -> [CLS x k, patches] + positional embedding.

    The stem is stored as `rgbt_stem` (vision, audio, thermal) or `depth_stem` (depth): upstream's
    key names. Inputs: vision (B, 3, H, W) images or (B, 3, T, H, W) clips; audio (B, 1, mels,
    frames); depth, thermal (B, 1, H, W).
    """

    def __init__(self, modality: str, cfg: ModalityConfig) -> None:
        super().__init__()
        self.modality = modality
        self.stem_name = "depth_stem" if modality == "depth" else "rgbt_stem"
        self.in_chans = cfg.in_chans
        self.embed_dim = dim = cfg.embed_dim
        self.num_cls_tokens = cfg.num_cls_tokens
        kernel, stride = tuple(cfg.kernel_size), tuple(cfg.stride or cfg.kernel_size)
        if modality == "vision":
            frames = cfg.input_size[0]
            proj = nn.Sequential(ImageToVideo(ntimes=frames),
                                 nn.Conv3d(cfg.in_chans, dim, kernel_size=kernel, stride=stride, bias=False))
            stem = PatchStem(proj, None)
        else:
            stem = PatchStem(nn.Conv2d(cfg.in_chans, dim, kernel_size=kernel, stride=stride, bias=False),
                             nn.LayerNorm(dim))  # eps 1e-5: upstream's default here, unlike the trunks'
        self.kernel_size, self.stride = kernel, stride
        setattr(self, self.stem_name, stem)
        layout = _conv_grid(tuple(cfg.input_size), kernel, stride)
        _cls_parameter(self, cfg.num_cls_tokens, dim)
        self.pos_embedding_helper = PosEmbedding(layout, cfg.num_cls_tokens, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        scale = self.embed_dim ** -0.5  # upstream's "openclip" init
        self.pos_embedding_helper.pos_embed.normal_().mul_(scale)
        if self.cls_token is not None:
            self.cls_token.normal_().mul_(scale)

    @property
    def stem(self) -> PatchStem:
        return getattr(self, self.stem_name)

    def check(self, x: torch.Tensor) -> None:
        """Refuse what cannot be encoded, before any work: rank, channels, too small, frames."""
        m, layout = self.modality, self.pos_embedding_helper.patches_layout
        ranks = (4, 5) if m == "vision" else (4,)
        if x.ndim not in ranks:
            want = ("(B, 3, H, W) images or (B, 3, T, H, W) clips (and (B, S, ...) for S clips per item)"
                    if m == "vision" else f"(B, {self.in_chans}, H, W) (and (B, S, {self.in_chans}, H, W) "
                    f"for S clips per item)")
            raise InputError(f"{m}: expected {want}, got shape {_shape(x)}")
        if x.shape[1] != self.in_chans:
            raise InputError(f"{m}: expected {self.in_chans} channel(s) on axis 1, got {x.shape[1]} "
                             f"(shape {_shape(x)})")
        spatial = tuple(x.shape[-2:])
        kernel = self.kernel_size[-2:]
        if any(s < k for s, k in zip(spatial, kernel)):
            raise InputError(f"{m}: input of spatial size {spatial} is smaller than the {kernel} patch kernel")
        if m == "vision":
            given = 1 if x.ndim == 4 else x.shape[2]
            frames = self.stem.proj[0].ntimes if given == 1 else given  # images and 1-frame clips are repeated
            t = (frames - self.kernel_size[0]) // self.stride[0] + 1 if frames >= self.kernel_size[0] else 0
            if t != layout[0]:
                raise InputError(f"vision: a clip of {given} frame(s) makes {t} temporal patch(es); the positional "
                                 f"embedding covers {layout[0]} (images, or clips of {self.stem.proj[0].ntimes} "
                                 f"frames), and time cannot be interpolated")

    def forward(self, x: torch.Tensor) -> Encoded:
        x = _float_input(x, self.pos_embedding_helper.pos_embed, self.modality)
        self.check(x)
        tokens, grid = self.stem(x)  # [B, n, D]
        k = self.num_cls_tokens
        cls_rows, patch_rows = self.pos_embedding_helper.rows(k, grid)
        return Encoded(_prepend_cls(tokens, self.cls_token, cls_rows, patch_rows), k)  # [B, k + n, D]


# -- IMU -----------------------------------------------------------------------------------------


class IMUPreprocessor(nn.Module):
    """(B, 6, L) accelerometer + gyroscope -> [CLS x k, L/8 patches] + `pos_embed`.

    Each patch is 8 consecutive samples of the 6 channels, flattened channel-major (48 values),
    projected by `imu_stem.proj` (bias-free Linear) and normalised by `imu_stem.norm_layer`.
    """

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        self.modality = "imu"
        self.in_chans = cfg.in_chans
        self.kernel_size = cfg.kernel_size[0]
        self.embed_dim = dim = cfg.embed_dim
        self.num_cls_tokens = cfg.num_cls_tokens
        self.length = cfg.input_size[0]
        self.num_patches = self.length // self.kernel_size
        self.imu_stem = PatchStem(nn.Linear(cfg.in_chans * self.kernel_size, dim, bias=False), nn.LayerNorm(dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + cfg.num_cls_tokens, dim))
        _cls_parameter(self, cfg.num_cls_tokens, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.cls_token is not None:
            self.cls_token.normal_().mul_(self.embed_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> Encoded:
        x = _float_input(x, self.pos_embed, "imu")
        if x.ndim != 3 or x.shape[1] != self.in_chans:
            raise InputError(f"imu: expected (B, {self.in_chans}, {self.length}) signals, got shape {_shape(x)}")
        n = x.shape[-1] // self.kernel_size
        if n != self.num_patches:
            raise InputError(f"imu: {x.shape[-1]} samples make {n} patches of {self.kernel_size}; the positional "
                             f"embedding covers {self.num_patches} ({self.length} samples) and cannot be "
                             f"interpolated")
        B = x.shape[0]
        x = x.unfold(-1, self.kernel_size, self.kernel_size)  # [B, C, n, 8]
        x = x.permute(0, 2, 1, 3).reshape(B, n, -1)           # [B, n, C * 8]
        tokens = self.imu_stem.norm_layer(self.imu_stem.proj(x))  # [B, n, D]
        k = self.num_cls_tokens
        return Encoded(_prepend_cls(tokens, self.cls_token, self.pos_embed[:, :k], self.pos_embed[:, k:]), k)


# -- text ----------------------------------------------------------------------------------------


def causal_mask(n: int) -> torch.Tensor:
    """[n, n] additive mask: -inf above the diagonal (a token sees itself and what precedes it)."""
    return torch.full((n, n), float("-inf")).triu_(1)


class TextPreprocessor(nn.Module):
    """(B, L) token ids, L <= context (77) -> token embeddings + `pos_embed[:, :L]`, the causal
    mask, and the end-of-text position for the head (the largest id in each row: EOT is the
    vocabulary's last entry, so `argmax` finds it, as upstream)."""

    def __init__(self, cfg: ModalityConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.context_length = cfg.context_length
        self.embed_dim = cfg.embed_dim
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.embed_dim))
        self.register_buffer("mask", causal_mask(cfg.context_length))  # persistent: upstream's key
        self.num_cls_tokens = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, text: torch.Tensor) -> Encoded:
        if (not isinstance(text, torch.Tensor) or text.is_floating_point() or text.is_complex()
                or text.dtype == torch.bool):
            got = text.dtype if isinstance(text, torch.Tensor) else type(text).__name__
            raise InputError(f"text: expected integer token ids (B, L), got {got}; tokenize strings with "
                             f"surgery_plugins.imagebind.tokenizer")
        if text.ndim != 2 or text.shape[1] == 0:
            raise InputError(f"text: expected token ids of shape (B, L) with 1 <= L <= {self.context_length}, "
                             f"got shape {_shape(text)}")
        L = text.shape[1]
        if L > self.context_length:
            raise InputError(f"text: {L} tokens, the context holds {self.context_length}; the tokenizer truncates "
                             f"(keeping the end-of-text token), token tensors are not cut silently")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= self.vocab_size):
            raise InputError(f"text: token ids must be in [0, {self.vocab_size}), got [{int(text.min())}, "
                             f"{int(text.max())}]")
        text = text.to(self.pos_embed.device)
        tokens = self.token_embedding(text) + self.pos_embed[:, :L]  # [B, L, D]
        return Encoded(tokens, 0, self.mask[:L, :L].to(tokens.dtype), text.argmax(dim=-1))


__all__ = ["Encoded", "ImageToVideo", "PatchStem", "PosEmbedding", "PatchPreprocessor", "IMUPreprocessor",
           "TextPreprocessor", "interpolate_patch_rows", "causal_mask"]
