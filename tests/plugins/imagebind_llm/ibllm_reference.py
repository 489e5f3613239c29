"""An independent reference of upstream's ImageBind-LLM (`imagebind_LLM/llama/llama_adapter.py`).

`RefImageBindLLM` restates upstream's `forward_visual` (normalise each modality's embedding,
weights divided by their sum + 1e-6, the weighted sum, the kNN cache, `unsqueeze(1)`, the bridge)
and the adapted layers (`visual_feats + prefix_query[i]`, recomputed in every layer at every
step) as functions of the model's state dict, on top of the LLaMA-Adapter tests' `RefAdapter`
(whose `RefLLaMA` is upstream's llama.py: one adapter token takes the gated-bias branch, several
the gated softmax) for the loss, `forward_inference` and the greedy `generate` loop. The ImageBind
encoder is a black box here (the imagebind plugin's tests hold it to its own reference).

Beyond upstream, written as plainly: a modality whose head returns k tokens (B, k, E) keeps them
(upstream's `unsqueeze(1)` is for one), and the kNN mix is done per embedding (upstream's batched
matmul is per embedding only at batch 1).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from test_llama import RefLLaMA, ref_mask, ref_rmsnorm
from test_model import RefAdapter


class RefImageBindLLM(RefAdapter):
    def __init__(self, model, knn_index=None):
        self.sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.cfg = model.config
        self.encoder = model.image_bind  # black box
        self.query_layer = model.query_layer
        self.llama = RefLLaMA(self.sd, self.cfg.llama_args(), prefix="llama.")
        self.knn_index = knn_index

    # -- forward_visual ---------------------------------------------------------------------------

    def embeddings(self, inputs, cache_size=10, cache_t=20, cache_weight=0.5):
        outputs, weights = [], []
        for input_type, (x, weight) in inputs.items():
            kind = "vision" if input_type in ("Image", "Video") else input_type.lower()
            e = F.normalize(self.encoder({kind: x})[kind], dim=-1)
            outputs.append(e.unsqueeze(1) if e.dim() == 2 else e)  # (B, k, E)
            weights.append(weight)
        weights = [w / (sum(weights) + 1e-6) for w in weights]
        feats = sum([o * w for o, w in zip(outputs, weights)])
        if self.knn_index is not None:
            feats = torch.stack([self.knn(row, cache_size, cache_t, cache_weight) for row in feats.flatten(0, 1)])
            feats = feats.view(*outputs[0].shape[:1], -1, feats.shape[-1])
        return feats  # (B, K, E)

    def knn(self, x, cache_size, cache_t, cache_weight):
        """Upstream's cache at batch 1: one (E,) embedding."""
        sims, ids = self.knn_index.search(x[None].detach().float().numpy(), cache_size)
        prototypes = torch.from_numpy(np.vstack([self.knn_index.reconstruct(int(i)) for i in ids[0]]))  # (S, E)
        sims = (torch.tensor(sims) * cache_t).softmax(dim=-1)  # (1, S)
        feats = sims @ prototypes
        feats = feats / feats.norm(dim=-1, keepdim=True)
        feats = (1 - cache_weight) * x + cache_weight * feats
        return (feats / feats.norm(dim=-1, keepdim=True))[0]

    def norm(self, name, x):
        if self.cfg.legacy_bridge:
            return F.layer_norm(x, x.shape[-1:], self.sd[name + ".weight"], self.sd[name + ".bias"], 1e-5)
        return ref_rmsnorm(x, self.sd[name + ".weight"], 1e-6)

    def lin(self, name, x):
        return F.linear(x, self.sd[name + ".weight"], self.sd.get(name + ".bias"))

    def bridge(self, x):
        x = self.lin("image_bind_proj", x)
        for k in (1, 2, 3):
            n = self.norm(f"image_bind_norm_{k}", x)
            x = x + self.lin(f"image_bind_f2_{k}", F.silu(self.lin(f"image_bind_f1_{k}", n))
                             * self.lin(f"image_bind_f3_{k}", n))
        return x

    def forward_visual(self, inputs, *knn_args):
        if not isinstance(inputs, dict):
            inputs = {"Image": [inputs, 1]}  # upstream's training forward
        return self.bridge(self.embeddings(inputs, *knn_args))

    # -- the adapted layers -----------------------------------------------------------------------

    def layers(self, h, start_pos, visual_feats):
        B, T, D = h.shape
        L, n = self.query_layer, self.cfg.n_layers
        freqs = self.llama.freqs_cis[start_pos:start_pos + T]
        mask = ref_mask(start_pos, T, h.dtype)
        for i in range(n - L):
            h = self.llama.block(i, h, start_pos, freqs, mask)
        prefix_query = self.sd["prefix_query.weight"].reshape(L, 1, D).unsqueeze(1)
        for j in range(L):
            h = self.llama.block(n - L + j, h, start_pos, freqs, mask, visual_feats + prefix_query[j].repeat(B, 1, 1))
        return h


__all__ = ["RefImageBindLLM"]
