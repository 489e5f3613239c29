"""Growth and shrink strategies against plain-torch references written here."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import strategies
from surgery.errors import StrategyError


def block(n, rest=(3, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *rest, generator=g).to(dtype)


def gen():
    return torch.Generator().manual_seed(1)


def test_zeros_appends_zero_tokens():
    b = block(2)
    out = strategies.grow_zeros(b, 5, gen())
    assert torch.equal(out[:2], b)
    assert torch.equal(out[2:], torch.zeros(3, 3, 4))


def test_mean_appends_per_feature_mean():
    b = block(3)
    out = strategies.grow_mean(b, 5, gen())
    expected = (b[0] + b[1] + b[2]) / 3
    assert torch.equal(out[:3], b)
    for i in (3, 4):
        torch.testing.assert_close(out[i], expected)


def test_copy_cycles_existing_tokens():
    b = block(2)
    out = strategies.grow_copy(b, 7, gen())
    for i in range(7):
        assert torch.equal(out[i], b[i % 2])


def test_normal_matches_statistics_and_is_seeded():
    b = block(64, rest=(16,)) * 3.0 + 5.0
    out = strategies.grow_normal(b, 64 + 4096, torch.Generator().manual_seed(7))
    again = strategies.grow_normal(b, 64 + 4096, torch.Generator().manual_seed(7))
    assert torch.equal(out, again)
    new = out[64:]
    assert torch.equal(out[:64], b)
    # per-feature mean of the new tokens near the old per-feature mean; spread near the old spread
    torch.testing.assert_close(new.mean(0), b.mean(0), atol=0.4, rtol=0)
    old_spread = (b - b.mean(0)).square().mean().sqrt()
    assert abs(float((new - new.mean(0)).square().mean().sqrt()) - float(old_spread)) < 0.2 * float(old_spread)


def test_normal_from_no_tokens_uses_timm_scale():
    out = strategies.grow_normal(block(0), 1000, gen())
    assert out.shape == (1000, 3, 4)
    assert float(out.std()) < 1e-5 and float(out.std()) > 1e-7


def test_normal_with_one_token_has_nonzero_spread():
    b = block(1)
    out = strategies.grow_normal(b, 3, gen())
    assert not torch.equal(out[1], b[0])


def test_interpolate_matches_linear_resampling():
    b = block(3, rest=(2,))
    out = strategies.grow_interpolate(b, 5, gen())
    # align_corners linear: positions 0, .5, 1, 1.5, 2 on the old grid
    expected = torch.stack([b[0], (b[0] + b[1]) / 2, b[1], (b[1] + b[2]) / 2, b[2]])
    torch.testing.assert_close(out, expected)


def test_truncate_keeps_prefix_and_pool_averages():
    b = block(4, rest=(2,))
    assert torch.equal(strategies.shrink_truncate(b, 2), b[:2])
    pooled = strategies.shrink_pool(b, 2)
    torch.testing.assert_close(pooled, torch.stack([(b[0] + b[1]) / 2, (b[2] + b[3]) / 2]))
    assert strategies.shrink_pool(b, 0).shape == (0, 2)


@pytest.mark.parametrize("name", ["mean", "copy", "interpolate"])
def test_strategies_needing_tokens_refuse_empty_block(name):
    with pytest.raises(StrategyError, match="zeros"):
        strategies.GROWTH[name](block(0), 2, gen())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(strategies.GROWTH))
def test_growth_keeps_dtype_and_existing_tokens(name, dtype):
    b = block(3, dtype=dtype)
    out = strategies.GROWTH[name](b, 6, gen())
    assert out.dtype == dtype and out.shape == (6, 3, 4)
    if name != "interpolate":
        assert torch.equal(out[:3], b)
    else:  # ends are kept exactly
        assert torch.equal(out[0], b[0]) and torch.equal(out[-1], b[-1])


def test_unknown_strategy_names_allowed_ones():
    with pytest.raises(StrategyError, match="allowed: restore, zeros, mean, normal, copy, interpolate"):
        strategies.check_growth("bogus")
    with pytest.raises(StrategyError, match="allowed: truncate, pool"):
        strategies.check_shrink("mean")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(0, 12), seed=st.integers(0, 2**16))
def test_every_strategy_gives_requested_count(n, m, seed):
    b = block(n, rest=(2,), seed=seed)
    if m >= n:
        for fn in strategies.GROWTH.values():
            assert fn(b, m, gen()).shape == (m, 2)
    else:
        for fn in strategies.SHRINK.values():
            assert fn(b, m).shape == (m, 2)


def spread(b):
    """The definition, in float64: per-feature means, one spread around them over all values."""
    x = b.double()
    mean = x.mean(0, keepdim=True)
    return mean, (x - mean).square().mean().sqrt()


@pytest.mark.parametrize("shape", [(2,), (5, 16), (3, 4, 5), (40, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_and_spread_by_slices_is_the_definition(monkeypatch, shape, dtype):
    monkeypatch.setattr(strategies, "NORMAL_CHUNK", 50)  # many slices of features
    b = (block(shape[0], rest=shape[1:]) * 3 + 1).to(dtype)
    mean, std = strategies.mean_and_spread(b)
    want_mean, want_std = spread(b)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == (1, *shape[1:])
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), want_std, rtol=1e-6, atol=0)


def reference_normal(b, m, seed):
    """mean + randn((m - n, *rest)) * std in float32, rounded once: grow_normal's definition
    (the statistics are checked against theirs above)."""
    mean, std = strategies.mean_and_spread(b)
    noise = torch.randn((m - b.shape[0], *b.shape[1:]), generator=torch.Generator().manual_seed(seed))
    return torch.cat([b, (mean + noise * std).to(b.dtype)])


@pytest.mark.parametrize("rest", [(16,), (3, 5), (1,), (7,)])
@pytest.mark.parametrize("chunk", [1, 40, 1 << 20])
def test_normal_drawn_in_chunks_is_one_seeded_draw(monkeypatch, rest, chunk):
    """The chunked draw (any chunk size, rows of any width, a short last chunk) gives exactly the
    values of a single torch.randn of all the new rows."""
    monkeypatch.setattr(strategies, "NORMAL_CHUNK", chunk)
    b = block(5, rest=rest) * 2.0 + 1.0
    for m in (6, 5 + 17, 5 + 100):
        out = strategies.grow_normal(b, m, torch.Generator().manual_seed(3))
        assert torch.equal(out, reference_normal(b, m, 3)), (rest, chunk, m)


@pytest.mark.parametrize("name", list(strategies.GROWTH))
def test_growth_into_a_strided_view_equals_the_returned_form(monkeypatch, name):
    """out= (the engine's rows of the new tensor, a strided view) gets the same values as the
    allocating form, and nothing outside it is written."""
    monkeypatch.setattr(strategies, "NORMAL_CHUNK", 24)
    b = block(3, rest=(4, 5))
    expected = strategies.GROWTH[name](b, 9, gen())
    table = torch.full((4, 11, 5), float("nan"))  # (rest0, tokens + 2 spare, rest1)
    rows = table[:, 1:10].movedim(1, 0)  # (9, 4, 5), not contiguous
    assert strategies.GROWTH[name](b, 9, gen(), out=rows) is rows
    assert torch.equal(table[:, 1:10].movedim(1, 0), expected)
    assert table[:, 0].isnan().all() and table[:, 10].isnan().all()


def test_growth_reads_a_block_that_is_the_front_of_out():
    """The engine's restore path hands over rows already placed at the front of `out`."""
    b = block(4, rest=(6,))
    for name, fn in strategies.GROWTH.items():
        out = torch.empty(10, 6)
        out[:4] = b
        fn(out[:4], 10, gen(), out=out)
        assert torch.equal(out, fn(b, 10, gen())), name


def test_growth_output_of_the_wrong_shape_is_refused():
    with pytest.raises(StrategyError, match=r"expected \(6, 3, 4\)"):
        strategies.grow_zeros(block(2), 6, gen(), out=torch.empty(6, 4, 3))
