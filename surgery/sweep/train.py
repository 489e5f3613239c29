"""Training token rows: `surgery.trainable(...)`, and the loops of a sweep that use it.

    with surgery.tokens(vit, reg_tokens=4, init="normal"):
        with surgery.trainable(vit, sites="reg_tokens", rows="new") as params:
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)   # then an ordinary loop

A parameter that holds chosen rows and others (a positional table, an adapter table) is masked
twice: a tensor hook zeroes the other rows' gradient, and after every optimizer step they are put
back from a copy, since weight decay and momentum move values whose gradient is zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import MetricDataError, SiteError, SweepError
from ..plugins import MetricSpec
from .grid import ROWS, Training


@dataclass
class _Masked:
    """A parameter of which only the rows in `mask` may change; `frozen` holds the others' values."""

    param: nn.Parameter
    mask: torch.Tensor  # bool, the parameter's shape
    frozen: torch.Tensor | None = None  # a copy taken on entry (partial masks only)

    @property
    def partial(self) -> bool:
        return not bool(self.mask.all())


def _since(model: nn.Module, names: Iterable[str], since: Mapping[str, int] | None,
           current: Mapping[str, int]) -> dict[str, int]:
    """The count each site's "new" rows are counted from (see `trainable`)."""
    from ..engine import model_state
    from ..guard import guard_of

    if since is not None:
        return {n: int(since.get(n, current[n])) for n in names}
    open_blocks = guard_of(model).open
    if open_blocks:
        before = open_blocks[-1].before
        return {n: before.get(n, current[n]) for n in names}
    initial: dict[str, int] = {}
    for step in model_state(model).recipe:
        initial.setdefault(step["site"], step["from"])
    return {n: initial.get(n, current[n]) for n in names}


def chosen_rows(model: nn.Module, sites: str | Iterable[str] | None = None, rows: str = "new",
                since: Mapping[str, int] | None = None) -> list[_Masked]:
    """The parameters holding the chosen rows, each with the mask of those rows (its own shape).
    Several sites on one tensor (an adapter table's two axes) give one mask, their union."""
    from ..engine import sites as model_sites
    from ..site import module_paths

    if rows not in ROWS:
        raise SweepError(f"rows={rows!r}: choose 'new' (the rows a site gained) or 'all' (every row of the site)")
    declared = model_sites(model)
    names = list(declared) if sites is None else [sites] if isinstance(sites, str) else list(sites)
    unknown = [n for n in names if n not in declared]
    if unknown:
        raise SiteError(f"trainable: the model has no token site {unknown[0]!r}; its sites: "
                        f"{', '.join(declared) or 'none'}")
    counts = {n: s.count for n, s in declared.items()}
    start_from = _since(model, names, since, counts)
    paths = module_paths(model)
    masks: dict[int, _Masked] = {}
    for name in names:
        site = declared[name]
        first = 0 if rows == "all" else max(0, min(start_from[name], site.count))
        if first >= site.count:
            continue  # nothing to train in this site (shrunk, or not grown)
        for t in site.tensors:
            value = t.current()
            if value is None:
                continue
            if not isinstance(value, nn.Parameter):
                raise SweepError(f"trainable: site {name!r} keeps its tokens in {t.key(paths)}, a buffer, not "
                                 f"a parameter; an optimizer cannot train it")
            viewed = torch.zeros(t.view if t.view is not None else value.shape, dtype=torch.bool,
                                 device=value.device)
            lo, hi = t.start + first, t.start + site.count  # the chosen tokens, in rows of the block
            if t.anchor == "end":  # token 0 is the block's last row: tokens first.. are the front rows
                lo, hi = t.start, t.start + site.count - first
            index = [slice(None)] * viewed.dim()
            index[t.axis % viewed.dim()] = slice(lo, hi)
            viewed[tuple(index)] = True
            mask = viewed.reshape(value.shape)
            entry = masks.get(id(value))
            if entry is None:
                masks[id(value)] = _Masked(value, mask)
            else:
                entry.mask |= mask
    return list(masks.values())


@contextlib.contextmanager
def trainable(model: nn.Module, sites: str | Iterable[str] | None = None, rows: str = "new", *,
              since: Mapping[str, int] | None = None) -> Iterator[list[nn.Parameter]]:
    """Freeze `model` but the chosen rows of `sites` (a name, names, or None for every site); yield
    the parameters to give an optimizer (empty when there is nothing to train: a site not grown).
    On exit every parameter's `requires_grad` is as it was; the rows not chosen never change.

    `rows="all"` chooses every row of the sites (coupled positional rows included); `rows="new"` the
    rows beyond the count a site had when the innermost open `surgery.tokens(...)` block was entered,
    else beyond the count the model was built with; `since={site: count}` says it explicitly. An
    end-anchored site's new rows are at the front, as the engine grows them."""
    chosen = chosen_rows(model, sites, rows, since)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles: list = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for entry in chosen:
            entry.param.requires_grad_(True)
            if entry.partial:
                entry.frozen = entry.param.detach().clone()
                mask = entry.mask
                handles.append(entry.param.register_hook(lambda grad, mask=mask: grad * mask))
        partial = [e for e in chosen if e.partial]
        if partial:
            handles.append(register_optimizer_step_post_hook(lambda optimizer, args, kwargs: _put_back(partial)))
        yield [entry.param for entry in chosen]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def _put_back(entries: list[_Masked]) -> None:
    """After any optimizer's step: the rows not chosen get their values from entry back (weight decay
    and momentum move them even with a zero gradient)."""
    for entry in entries:
        if entry.param.shape != entry.frozen.shape:
            raise SweepError("a parameter changed shape inside surgery.trainable(...) (a resize inside the block); "
                             "resize first, then open trainable")
        entry.param.copy_(torch.where(entry.mask, entry.param, entry.frozen))


# -- the sweep's loops ----------------------------------------------------------------------------


def batches(records: Sequence[Any], batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` records: epochs of a permutation drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(records), generator=gen).tolist() * max(1, -(-batch_size // len(records)))
        take, order = order[:batch_size], order[batch_size:]
        yield [records[i] for i in take]


def fit(model: nn.Module, params: Sequence[nn.Parameter], loss: Callable[[Sequence[Any]], torch.Tensor],
        records: Sequence[Any], *, steps: int, lr: float, batch_size: int, seed: int,
        weight_decay: float = 0.0) -> list[float]:
    """Minimise `loss(batch)` over `params` for `steps` steps; returns each step's loss."""
    if not records:
        raise MetricDataError("training needs train records, and the data has none (every record is in 'eval')")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses = []
    try:
        for batch in batches(records, batch_size, steps, seed):
            optimizer.zero_grad(set_to_none=True)
            value = loss(batch)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
    finally:
        model.train(was_training)
    return losses


def train_tokens(evaluation: Any, objective: MetricSpec, sites: Sequence[str], training: Training,
                 seed: int) -> list[float]:
    """Train the chosen rows of `sites` (`training.rows`) for `training.steps` steps on the objective's
    loss over the train records. Nothing to train (a site not grown, rows="new"): no steps, []."""
    with trainable(evaluation.model, sites=list(sites), rows=training.rows) as params:
        if not params:
            return []
        return fit(evaluation.model, params, lambda batch: objective.loss(evaluation, batch),
                   evaluation.data.part("train"), steps=training.steps, lr=training.lr,
                   batch_size=training.batch_size, seed=seed)


__all__ = ["trainable", "chosen_rows", "fit", "train_tokens", "batches"]
