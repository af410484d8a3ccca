"""TTA: exact round trips, 8 distinct D4 views, and averages checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.core.tta import SCALES, TTA_SETS, predict_tta

# Views that only move pixels (every view but the multi-scale ones, which interpolate).
ALL_TRANSFORMS = [(name, t) for name, ts in TTA_SETS.items() for t in ts if t.scale == 1]
PIXEL_SETS = [name for name, ts in TTA_SETS.items() if all(t.scale == 1 for t in ts)]


@pytest.mark.parametrize(("set_name", "t"), ALL_TRANSFORMS, ids=[f"{s}-{t.name}" for s, t in ALL_TRANSFORMS])
def test_round_trip_is_exact_on_non_square(set_name: str, t) -> None:
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    y = t.augment(x)
    assert torch.equal(t.deaugment(y), x)
    # Rotations by 90/270 degrees swap H and W; everything else keeps them.
    assert tuple(y.shape[-2:]) in ((5, 7), (7, 5))


def test_set_sizes() -> None:
    assert [len(TTA_SETS[k]) for k in ("none", "flip", "d4", "ms", "d4_ms")] == [1, 3, 8, 3, 24]


def test_d4_views_are_distinct() -> None:
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    views = [t.augment(x) for t in TTA_SETS["d4"]]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(views[i], views[j]), (TTA_SETS["d4"][i].name, TTA_SETS["d4"][j].name)


def _pixelwise_model(x: torch.Tensor) -> torch.Tensor:
    """Equivariant under any pixel permutation: a per-pixel function of the channels."""
    return (x[:, :1] * 2.0 - x[:, 1:2]).clone()


@pytest.mark.parametrize("tta", PIXEL_SETS)
@pytest.mark.parametrize("merge_batch", [True, False])
def test_equivariant_model_gives_the_single_prediction(tta: str, merge_batch: bool) -> None:
    x = torch.randn(3, 3, 8, 12, generator=torch.Generator().manual_seed(2))
    single = torch.sigmoid(_pixelwise_model(x))
    out = predict_tta(_pixelwise_model, x, tta=tta, activation="sigmoid", merge_batch=merge_batch)
    assert out.shape == (3, 1, 8, 12)
    torch.testing.assert_close(out, single, rtol=0, atol=1e-6)


def _ramp_model(x: torch.Tensor) -> torch.Tensor:
    """Not equivariant: adds a fixed 2x2 pattern [[0, 1], [2, 3]] whatever the orientation of x."""
    ramp = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    return x[:, :1] + ramp


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_flip_average_by_hand() -> None:
    x = torch.zeros(1, 1, 2, 2)
    out = predict_tta(_ramp_model, x, tta="flip", activation="sigmoid")
    # Views seen in the input frame: identity [[0,1],[2,3]], hflip [[1,0],[3,2]], vflip [[2,3],[0,1]].
    expected = torch.tensor(
        [
            [(_sig(0) + _sig(1) + _sig(2)) / 3, (_sig(1) + _sig(0) + _sig(3)) / 3],
            [(_sig(2) + _sig(3) + _sig(0)) / 3, (_sig(3) + _sig(2) + _sig(1)) / 3],
        ]
    )
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)


def test_d4_average_by_hand() -> None:
    # Over the 8 symmetries every pixel of the 2x2 pattern visits each of the 4 values exactly twice.
    x = torch.zeros(1, 1, 2, 2)
    out = predict_tta(_ramp_model, x, tta="d4", activation="sigmoid")
    expected = (_sig(0) + _sig(1) + _sig(2) + _sig(3)) / 4
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), expected), rtol=0, atol=1e-6)


def test_probabilities_not_logits_are_averaged() -> None:
    x = torch.zeros(1, 1, 2, 2)
    out = predict_tta(_ramp_model, x, tta="d4", activation="sigmoid")
    logit_mean = _sig((0 + 1 + 2 + 3) / 4)
    assert abs(out[0, 0, 0, 0].item() - logit_mean) > 1e-3


def _conv_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Conv2d(3, 2, kernel_size=3, padding=1).eval()


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (2, 3, 16, 24)])
@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_merged_and_sequential_agree(shape: tuple[int, ...], tta: str) -> None:
    model = _conv_model()
    calls: list[tuple[int, ...]] = []

    def model_fn(v: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(v.shape))
        return model(v)

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    merged = predict_tta(model_fn, x, tta=tta, activation="softmax", merge_batch=True)
    n_merged = len(calls)
    sequential = predict_tta(model_fn, x, tta=tta, activation="softmax", merge_batch=False)
    torch.testing.assert_close(merged, sequential, rtol=0, atol=1e-6)
    assert merged.shape == (2, 2, *shape[-2:])
    torch.testing.assert_close(merged.sum(1), torch.ones(2, *shape[-2:]))
    n_views = len(TTA_SETS[tta])
    square = shape[-1] == shape[-2]
    # One forward per distinct view shape when merged: d4 on a non-square input needs two.
    assert n_merged == (1 if square or tta == "flip" else 2)
    assert len(calls) - n_merged == n_views
    assert calls[0][0] == shape[0] * (n_views if n_merged == 1 else n_views // 2)


def test_bad_inputs_say_what_to_do() -> None:
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="none, flip, d4"):
        predict_tta(_pixelwise_model, x, tta="d8")
    with pytest.raises(ValueError, match="sigmoid"):
        predict_tta(_pixelwise_model, x, activation="relu")
    with pytest.raises(ValueError, match="batch size, H and W"):
        predict_tta(lambda v: v[:, :1, ::2, ::2], x, tta="flip")


def test_max_images_bounds_every_forward_and_changes_nothing() -> None:
    """16 tiles x 8 D4 views in one forward took 18 GB at 512 px: the cap cuts the merged batch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    sizes: list[int] = []

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return conv(x)

    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        whole = predict_tta(model_fn, x, "d4")
        assert sizes == [48]
        sizes.clear()
        capped = predict_tta(model_fn, x, "d4", max_images=10)
    assert max(sizes) <= 10 and sum(sizes) == 48
    torch.testing.assert_close(capped, whole)


# ----------------------------------------------------------------------------- multi-scale


def _identity_probs(x: torch.Tensor) -> torch.Tensor:
    return x[:, :1].clone()


@pytest.mark.parametrize("tta", ["ms", "d4_ms"])
def test_multi_scale_round_trip(tta: str) -> None:
    """Round trip through the views of a multi-scale set: the model sees the input at 0.75, 1 and 1.25
    of its size; the output comes back at the input's H x W, exactly for a constant image and within
    interpolation error for a smooth one."""
    seen = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return _identity_probs(x)

    const = torch.full((2, 3, 64, 48), 0.25)
    out = predict_tta(model, const, tta=tta, activation="none", merge_batch=False)
    assert out.shape == (2, 1, 64, 48)
    torch.testing.assert_close(out, const[:, :1], rtol=0, atol=1e-6)
    sizes = {round(64 * s) for s in SCALES} | {round(48 * s) for s in SCALES}
    assert {h for h, _ in seen} | {w for _, w in seen} == sizes  # 48, 60, 64, 80 (and 36 for 48 * 0.75)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 48), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(3 * yy) * torch.cos(2 * xx)).expand(2, 3, 64, 48)
    out = predict_tta(_identity_probs, smooth, tta=tta, activation="none")
    assert (out - smooth[:, :1]).abs().max() < 0.02  # border pixels carry the interpolation error


def test_multi_scale_averages_the_scales_by_hand() -> None:
    """A model whose output depends on the size it sees: the mean over the three scales of its output."""

    def by_size(x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], float(x.shape[-1]))  # constant: resizing it back is exact

    x = torch.zeros(1, 3, 32, 32)
    out = predict_tta(by_size, x, tta="ms", activation="none")
    torch.testing.assert_close(out, torch.full((1, 1, 32, 32), (24 + 32 + 40) / 3))


@pytest.mark.parametrize("tta", list(TTA_SETS))
def test_max_images_bounds_the_pixels_of_every_forward_in_every_set(tta: str) -> None:
    """d4_ms makes 1.25-scale views (640 px for a 512 px tile): counted in images, one forward of 32 of
    them held 1.56 x the pixels the bound promised (10.9 GB against 5.6 GB for d4 at 512 px on CPU).
    Counted in pixels of the input's size, no forward of any set exceeds it, and the result is the same."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)
    pixels: list[int] = []

    def model_fn(v: torch.Tensor) -> torch.Tensor:
        pixels.append(v.shape[0] * v.shape[-2] * v.shape[-1])
        return conv(v)

    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        whole = predict_tta(model_fn, x, tta)
        pixels.clear()
        capped = predict_tta(model_fn, x, tta, max_images=4)
    assert max(pixels) <= 4 * 32 * 32
    views = TTA_SETS[tta]
    assert sum(pixels) == sum(5 * round(32 * t.scale) ** 2 for t in views)  # every view of every tile once
    torch.testing.assert_close(capped, whole)


def test_a_view_larger_than_the_bound_still_runs_one_image_at_a_time() -> None:
    sizes: list[int] = []

    def model_fn(v: torch.Tensor) -> torch.Tensor:
        sizes.append(v.shape[0])
        return v[:, :1]

    predict_tta(model_fn, torch.rand(3, 3, 16, 16), "ms", activation="none", max_images=1)
    assert sizes == [1, 1, 1, 1, 1, 1, 1, 1, 1]  # 0.75 x 0.75 of a tile fits once; 1.25^2 is > 1
