"""A small backbone plugin used by the core tests: every kind of site the engine supports.

`ToyModel` has
  * `prompts`: learned tokens (P, D) with coupled positional rows in `pos` (1, P + S, D), a
    counter attribute and a counter inside a config dict;
  * `query_len`: an adapter table stored flat as `nn.Embedding(L * Q, D)` and declared with the
    view (L, Q, D), so the engine resizes along Q; `adapter.num_embeddings` follows;
  * `query_layer`: the L axis of the same view, applied through the `surgery_apply_count` hook
    because it also changes which layers get an adapter (a structural change);
  * `memory`: tokens absent (None) while the count is zero, with a template.
The forward uses all of them, so a stale counter or a stale row changes the output.
"""

from __future__ import annotations

import torch
from torch import nn

import surgery
from surgery.site import Counter, TokenSite, TokenTensor

BACKBONE = "toy"


class ToyModel(nn.Module):
    def __init__(self, prompts=2, query_len=3, query_layer=2, layers=4, memory=0, dim=8, seq=5):
        super().__init__()
        self.num_prompts, self.query_len, self.query_layer, self.dim = prompts, query_len, query_layer, dim
        self.config = {"num_prompts": prompts}
        self.prompts = nn.Parameter(torch.randn(prompts, dim))
        self.pos = nn.Parameter(torch.randn(1, prompts + seq, dim))
        self.adapter = nn.Embedding(query_layer * query_len, dim)
        self.adapter_layers = list(range(layers - query_layer, layers))
        self.memory = nn.Parameter(torch.randn(1, memory, dim)) if memory else None
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):  # x: (B, S, D)
        B = x.shape[0]
        h = torch.cat([self.prompts.expand(B, -1, -1), x], dim=1) + self.pos  # (B, P+S, D)
        if self.memory is not None:
            h = torch.cat([self.memory.expand(B, -1, -1), h], dim=1)  # (B, M+P+S, D)
        adapter = self.adapter.weight.view(self.query_layer, self.query_len, self.dim)  # (L, Q, D)
        for i, layer in enumerate(self.layers):
            h = torch.tanh(layer(h))
            if i in self.adapter_layers:
                a = adapter[self.adapter_layers.index(i)]  # (Q, D)
                h = h + torch.softmax(h @ a.t(), dim=-1) @ a  # (B, T, D)
        return h[:, : self.num_prompts].sum(1) + h.mean(1)  # (B, D)


def toy_sites(model: ToyModel) -> list[TokenSite]:
    L, Q, D = model.query_layer, model.query_len, model.dim
    table = model.adapter
    return [
        TokenSite(
            "prompts", model.num_prompts,
            tensors=[TokenTensor(model, "prompts", axis=0), TokenTensor(model, "pos", axis=1, coupled=True)],
            counters=[Counter(model, "num_prompts"), Counter(model.config, "num_prompts")],
            min=0, max=16, default_init="zeros",
        ),
        TokenSite(
            "query_len", Q,
            tensors=[TokenTensor(table, "weight", axis=1, view=(L, Q, D))],
            counters=[Counter(model, "query_len"), Counter(table, "num_embeddings", lambda q: L * q)],
            min=1, max=64, default_init="normal",
        ),
        TokenSite(
            "query_layer", L,
            tensors=[TokenTensor(table, "weight", axis=0, view=(L, Q, D))],
            counters=[Counter(model, "query_layer"), Counter(table, "num_embeddings", lambda n: n * Q)],
            min=1, max=len(model.layers), default_init="zeros",
            note="adapters go to the last query_layer layers",
        ),
        TokenSite(
            "memory", 0 if model.memory is None else model.memory.shape[1],
            tensors=[TokenTensor(model, "memory", axis=1, template=torch.empty(1, 0, D))],
            min=0, max=None, step=2, default_init="normal",
        ),
    ]


class ToyPlugin:
    """Registered under the name "toy"; `events` records every before/after-resize call."""

    def __init__(self):
        self.events = []

    @surgery.hookimpl
    def surgery_register_backbones(self, register):
        register(BACKBONE, lambda m: isinstance(m, ToyModel), description="toy backbone for tests")

    @surgery.hookimpl
    def surgery_register_models(self, register):
        register("toy_tiny", lambda **kw: ToyModel(**kw), BACKBONE, description="tiny toy",
                 example_inputs=lambda m: (torch.randn(2, 5, m.dim, generator=torch.Generator().manual_seed(0)),))

    @surgery.hookimpl
    def surgery_token_sites(self, model, backbone):
        return toy_sites(model) if backbone == BACKBONE else None

    @surgery.hookimpl
    def surgery_apply_count(self, model, backbone, change):
        if backbone != BACKBONE or change.site.name != "query_layer":
            return None
        change.apply_default()  # the table's L axis and the counters
        layers = len(model.layers)
        change.edit.set_attr(model, "adapter_layers", list(range(layers - change.new, layers)))
        return True

    @surgery.hookimpl
    def surgery_before_resize(self, model, backbone, changes):
        self.events.append(("before", backbone, dict(changes)))

    @surgery.hookimpl
    def surgery_after_resize(self, model, backbone, changes):
        self.events.append(("after", backbone, dict(changes)))


def snapshot(model: nn.Module) -> dict:
    """Everything a resize may touch, for bit-exact comparisons: tensors (cloned), ids, attributes."""
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    attrs = {k: v for k, v in vars(model).items() if isinstance(v, (int, float, str, bool, list, dict, type(None)))}
    return {"state": state, "keys": list(state), "params": params, "attrs": repr(attrs)}


def assert_same(a: dict, b: dict, same_objects: bool = True) -> None:
    """Same keys, shapes, dtypes, values and attributes (and, for one model, the same parameter objects)."""
    assert a["keys"] == b["keys"]
    if same_objects:
        assert a["params"] == b["params"]
    assert a["attrs"] == b["attrs"]
    for key in a["keys"]:
        x, y = a["state"][key], b["state"][key]
        assert x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y), key
