"""An independent pure-torch ImageBind forward, written from upstream's semantics, for the tests.

It reads a state dict by upstream's key names (not our modules) and follows upstream's code path
step by step: `cat(cls, tokens) + pos_embed`, positional interpolation by `scale_factor`
(upstream's `interpolate_pos_encoding_2d`, square layouts), sequence-first
`torch.nn.MultiheadAttention` in every block, LayerNorm over *all* tokens then select, clip
averaging. Beyond upstream, two generalisations the plugin claims, written as plainly: k CLS rows
kept in front when interpolating, and the head modes `mean` / `all`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def interpolate_pos(pos, k, layout, n_patches):
    """Upstream's interpolation with the first k rows kept (upstream allows k <= 1)."""
    N = pos.shape[1] - k
    if n_patches == N:
        return pos
    cls, grid = pos[:, :k], pos[:, k:]
    side, dim = int(math.sqrt(N)), pos.shape[-1]
    assert layout[-1] == layout[-2], "square layouts only, as upstream"
    x = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=math.sqrt(n_patches / N), mode="bicubic")
    return torch.cat([cls, x.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def patch_tokens(sd, modality, x, k, layout, stride):
    pre = f"modality_preprocessors.{modality}"
    stem = f"{pre}.{'depth_stem' if modality == 'depth' else 'rgbt_stem'}"
    if modality == "vision":
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.repeat(1, 1, 2, 1, 1)
        w = sd[f"{stem}.proj.1.weight"]
        t = F.conv3d(x, w, stride=w.shape[2:])
    else:
        t = F.conv2d(x, sd[f"{stem}.proj.weight"], stride=stride)
    t = t.flatten(2).transpose(1, 2)
    if modality != "vision":
        t = _ln(t, sd, f"{stem}.norm_layer", 1e-5)
    if k:
        t = torch.cat([sd[f"{pre}.cls_token"].expand(t.shape[0], -1, -1), t], dim=1)
    pos = interpolate_pos(sd[f"{pre}.pos_embedding_helper.pos_embed"], k, layout, t.shape[1] - k)
    return t + pos


def imu_tokens(sd, x, k):
    pre = "modality_preprocessors.imu"
    B = x.shape[0]
    p = x.unfold(-1, 8, 8).permute(0, 2, 1, 3).reshape(B, x.shape[-1] // 8, -1)
    t = _ln(p @ sd[f"{pre}.imu_stem.proj.weight"].t(), sd, f"{pre}.imu_stem.norm_layer", 1e-5)
    if k:
        t = torch.cat([sd[f"{pre}.cls_token"].expand(B, -1, -1), t], dim=1)
    return t + sd[f"{pre}.pos_embed"]


def text_tokens(sd, ids):
    pre = "modality_preprocessors.text"
    return sd[f"{pre}.token_embedding.weight"][ids] + sd[f"{pre}.pos_embed"], sd[f"{pre}.mask"]


def block(sd, prefix, x, heads, mask):
    """One upstream block, attention through torch's own nn.MultiheadAttention (sequence-first)."""
    dim = x.shape[-1]
    bias_kv = f"{prefix}.attn.bias_k" in sd
    mha = torch.nn.MultiheadAttention(dim, heads, bias=True, add_bias_kv=bias_kv).to(x.dtype)
    mha.load_state_dict({k[len(prefix) + 6:]: v for k, v in sd.items() if k.startswith(f"{prefix}.attn.")})
    mha.eval()
    h = _ln(x, sd, f"{prefix}.norm_1", 1e-6).transpose(0, 1)  # (L, B, D)
    x = x + mha(h, h, h, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
    h = _ln(x, sd, f"{prefix}.norm_2", 1e-6)
    h = F.gelu(F.linear(h, sd[f"{prefix}.mlp.fc1.weight"], sd[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def trunk(sd, modality, x, heads, mask=None):
    prefix = f"modality_trunks.{modality}"
    if f"{prefix}.pre_transformer_layer.0.weight" in sd:
        x = _ln(x, sd, f"{prefix}.pre_transformer_layer.0", 1e-6)
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{prefix}.blocks."))
    for i in range(n):
        x = block(sd, f"{prefix}.blocks.{i}", x, heads, mask)
    return x


def head(sd, modality, x, k=1, mode="first", eot=None):
    prefix = f"modality_heads.{modality}"
    if modality == "text":
        x = _ln(x, sd, f"{prefix}.proj.0", 1e-6)[torch.arange(x.shape[0]), eot]
        return x @ sd[f"{prefix}.proj.1.weight"].t()
    x = _ln(x, sd, f"{prefix}.0", 1e-6)  # upstream normalises every token, then selects
    x = x[:, 0] if mode == "first" else x[:, :k]
    if mode == "mean":
        x = x.mean(dim=1)
    weight = sd[f"{prefix}.{3 if modality == 'imu' else 2}.weight"]
    return x @ weight.t()


def post(sd, modality, x):
    x = F.normalize(x, dim=-1)
    key = f"modality_postprocessors.{modality}.1.log_logit_scale"
    return x if key not in sd else torch.clip(sd[key].exp(), max=100) * x


def embed(sd, cfg, modality, x, k=1, mode="first"):
    """One modality's embeddings, upstream's `ImageBindModel.forward` for it (clips averaged)."""
    m = cfg.modalities[modality]
    clips = x.shape[:2] if x.ndim >= 5 else None
    if clips is not None:
        x = x.reshape(-1, *x.shape[2:])
    mask, eot = None, None
    if modality == "text":
        tokens, mask = text_tokens(sd, x)
        eot = x.argmax(dim=-1)
    elif modality == "imu":
        tokens = imu_tokens(sd, x, k)
    else:
        stride = m.stride or m.kernel_size
        layout = [(s - kk) // st + 1 for s, kk, st in zip(m.input_size[-2:], m.kernel_size[-2:], stride[-2:])]
        tokens = patch_tokens(sd, modality, x, k, layout, stride)
    h = trunk(sd, modality, tokens, m.num_heads, mask)
    e = post(sd, modality, head(sd, modality, h, k, mode, eot))
    if clips is not None:
        e = e.reshape(*clips, *e.shape[1:]).mean(dim=1)
    return e
