"""engines.nets (DnCNN, SRNet), the normalisation contract and model.toml validation."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.errors import ManifestError
from engines.manifest import ModelManifest, Tile
from engines.nets import DnCNN, SRNet, _asinh, _sinh, build, lanczos_kernel, parameter_count
from engines.netspec import NetSpec
from engines.normalization import Normalization
from train.presets import PRESETS

DNCNN = NetSpec("dncnn", depth=4, width=8, unshuffle=2)
SRNET = NetSpec("srnet", depth=2, width=8, unshuffle=1, scale=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _perturb(model: torch.nn.Module) -> None:
    """Give every parameter (the zero-initialised last layers too) a random value."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)


@pytest.mark.parametrize(("h", "w"), [(37, 50), (32, 32), (1, 3), (64, 33)])
@pytest.mark.parametrize("unshuffle", [1, 2, 3])
def test_dncnn_output_shape_equals_input(h: int, w: int, unshuffle: int) -> None:
    model = DnCNN(NetSpec("dncnn", depth=4, width=8, unshuffle=unshuffle)).eval()
    _perturb(model)
    with torch.no_grad():
        out = model(torch.randn(2, 1, h, w))
    assert out.shape == (2, 1, h, w)
    assert torch.isfinite(out).all()


def test_dncnn_with_context_slices_outputs_one_channel() -> None:
    model = DnCNN(NetSpec("dncnn", depth=4, width=8, unshuffle=2, context_slices=3)).eval()
    _perturb(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 37, 50))
    assert out.shape == (1, 1, 37, 50)


def _rms(t: torch.Tensor) -> float:
    return float(t.pow(2).mean().sqrt())


@pytest.mark.parametrize("context", [1, 3, 5])
def test_dncnn_starts_close_to_the_identity_on_the_centre_slice(context: int) -> None:
    """The last convolution starts (near) zero, so an untrained net passes the centre slice."""
    model = build(NetSpec("dncnn", depth=4, width=8, unshuffle=2, context_slices=context)).eval()
    assert isinstance(model, DnCNN)
    x = torch.randn(2, context, 37, 50)
    with torch.no_grad():
        out = model(x)
    centre = x[:, context // 2 : context // 2 + 1]
    assert _rms(out - centre) < 0.05 * _rms(centre)
    for other in range(context):
        if other != context // 2:  # the other slices are not what comes out
            assert _rms(out - x[:, other : other + 1]) > 0.5 * _rms(centre)


def test_asinh_and_sinh_from_elementwise_ops_match_torch() -> None:
    """They are written out so that the legacy ONNX exporter takes them: exact for both signs."""
    z = torch.linspace(-40.0, 40.0, 8001, dtype=torch.float64)
    torch.testing.assert_close(_asinh(z), torch.asinh(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_sinh(torch.asinh(z)), z, rtol=1e-9, atol=1e-9)


def test_asinh_dncnn_removes_the_noise_in_the_asinh_domain() -> None:
    """u = asinh((x - offset) gain); out = offset + sinh(u - body(u)) / gain."""
    spec = NetSpec("dncnn", depth=3, width=8, unshuffle=1, offset=0.25, gain=20.0, transform="asinh")
    model = DnCNN(spec).eval()
    _perturb(model)
    x = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        out = model(x)
        u = torch.asinh((x - 0.25) * 20.0)
        expected = 0.25 + torch.sinh(u - model.body(u)) / 20.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    linear = DnCNN(NetSpec("dncnn", depth=3, width=8, unshuffle=1, offset=0.25, gain=20.0)).eval()
    linear.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert float((linear(x) - out).abs().max()) > 1e-3  # the transform changes what comes out


def test_relax_lowers_the_asinh_gain_where_the_noise_map_is_large() -> None:
    """relax: gain_eff = gain / (1 + relax * gain * level); out = offset + sinh(asinh((x - offset)
    gain_eff) - body) / gain_eff, per pixel of the map; it needs asinh and a noise map."""
    spec = NetSpec(
        "dncnn", depth=3, width=8, unshuffle=1, offset=0.25, gain=20.0, transform="asinh", noise_map=True, relax=2.0
    )
    model = DnCNN(spec).eval()
    _perturb(model)
    x = torch.rand(2, 1, 16, 16)
    level = torch.tensor([0.001, 0.06]).view(2, 1, 1, 1).expand(2, 1, 16, 16)
    with torch.no_grad():
        out = model(torch.cat([x, level], dim=1))
        gain = 20.0 / (1.0 + 2.0 * 20.0 * level)
        u = torch.asinh((x - 0.25) * gain)
        expected = 0.25 + torch.sinh(u - model.body(torch.cat([u, level * 20.0 * 10.0], dim=1))) / gain
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    fixed = DnCNN(replace(spec, relax=0.0)).eval()
    fixed.load_state_dict(model.state_dict())
    with torch.no_grad():
        fixed_out = fixed(torch.cat([x, level], dim=1))
    assert float((fixed_out[1] - out[1]).abs().max()) > 10 * float((fixed_out[0] - out[0]).abs().max())
    for bad in (replace(spec, noise_map=False), replace(spec, transform="linear"), replace(spec, relax=-1.0)):
        with pytest.raises(ValueError, match="adapts the asinh transform to the noise map"):
            DnCNN(bad)


def test_asinh_compresses_an_air_edge_but_not_soft_tissue_noise() -> None:
    """What the transform is for: in the ct-denoise normalisation a 1040 HU air step is ~42 noise
    SDs (25 HU) for the linear net and under half that for the asinh one, while soft tissue
    (-100..100 HU) stays within 15% of linear."""
    hu = lambda v: (v + 1024.0) / 4095.0  # noqa: E731  (the CT normalisation, DESIGN 3.4)
    z = lambda v: (hu(v) - 0.25) * 20.0  # noqa: E731
    noise = float(z(25.0) - z(0.0))
    step_linear = float(z(40.0) - z(-1000.0))
    step_asinh = float(_asinh(torch.tensor(z(40.0))) - _asinh(torch.tensor(z(-1000.0))))
    assert step_linear / noise > 40 and step_asinh < 0.5 * step_linear
    soft = torch.tensor([z(-100.0), z(0.0), z(100.0)])
    slopes = (_asinh(soft + 1e-3) - _asinh(soft)) / 1e-3
    assert float(slopes.min()) > 0.85


def test_dncnn_subtracts_predicted_noise_from_the_centre_slice() -> None:
    model = DnCNN(NetSpec("dncnn", depth=3, width=8, unshuffle=1, context_slices=3)).eval()
    _perturb(model)
    x = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        out = model(x)
        noise = model.body(x)
    torch.testing.assert_close(out, x[:, 1:2] - noise)
    assert not torch.allclose(out, x[:, 1:2])


def test_dncnn_is_translation_equivariant_across_the_padding() -> None:
    """Odd sizes are padded at the bottom/right only: the top-left content is unaffected by it."""
    model = DnCNN(DNCNN).eval()
    _perturb(model)
    x = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        full = model(x)
        cropped = model(x[..., :37, :37])
    # far from the cropped edge (beyond the receptive field) the outputs agree
    torch.testing.assert_close(cropped[..., :20, :20], full[..., :20, :20], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("h", "w"), [(16, 16), (17, 23)])
@pytest.mark.parametrize("context", [1, 3])
def test_srnet_output_is_scaled(h: int, w: int, context: int) -> None:
    model = build(NetSpec("srnet", depth=2, width=8, unshuffle=1, scale=2, context_slices=context)).eval()
    assert isinstance(model, SRNet)
    _perturb(model)
    with torch.no_grad():
        out = model(torch.randn(2, context, h, w))
    assert out.shape == (2, 1, 2 * h, 2 * w)


def test_srnet_scale_three() -> None:
    model = SRNet(NetSpec("srnet", depth=1, width=8, scale=3)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 10, 11)).shape == (1, 1, 30, 33)


def test_srnet_starts_close_to_bilinear_upsampling_of_the_centre_slice() -> None:
    model = SRNet(NetSpec("srnet", depth=2, width=8, scale=2, context_slices=3)).eval()
    x = torch.randn(1, 3, 12, 15)
    with torch.no_grad():
        out = model(x)
        base = F.interpolate(x[:, 1:2], scale_factor=2.0, mode="bilinear", align_corners=False)
        other = F.interpolate(x[:, 0:1], scale_factor=2.0, mode="bilinear", align_corners=False)
    assert _rms(out - base) < 0.1 * _rms(base)
    assert _rms(out - other) > 0.5 * _rms(base)


def test_srnet_learns_a_residual_over_bilinear() -> None:
    model = SRNet(SRNET).eval()
    _perturb(model)
    x = torch.randn(1, 1, 12, 15)
    with torch.no_grad():
        residual = model(x) - F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        expected = F.pixel_shuffle(model.tail(model.head(x) + model.blocks(model.head(x))), 2)
    torch.testing.assert_close(residual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3])
def test_lanczos_kernel_phases_sum_to_one_and_sample_pixel_centres(scale: int) -> None:
    kernel = lanczos_kernel(scale, 4)
    assert kernel.shape == (scale * scale, 1, 9, 9)
    torch.testing.assert_close(kernel.sum(dim=(1, 2, 3)), torch.ones(scale * scale))
    # a ramp comes out at the centres of the output blocks (a quarter-pixel slip would be off by 0.25)
    ramp = torch.arange(20, dtype=torch.float32).view(1, 1, 1, 20).expand(1, 1, 20, 20)
    model = SRNet(NetSpec("srnet", depth=1, width=4, scale=scale, base_taps=4)).eval()
    with torch.no_grad():
        model.tail.weight.zero_()
        model.tail.bias.zero_()
        out = model(ramp)
    expected = (torch.arange(20 * scale, dtype=torch.float32) + 0.5) / scale - 0.5
    torch.testing.assert_close(out[0, 0, 30, 8 : 20 * scale - 8], expected[8 : 20 * scale - 8], atol=0.03, rtol=0)


def test_lanczos_base_matches_pillow_and_keeps_detail_bilinear_blurs() -> None:
    """Lanczos-3 is Pillow's LANCZOS; a wider window recovers a band-limited pattern (what a
    k-space-truncated image holds) far better than bilinear."""
    from PIL import Image

    y, x = np.mgrid[:48, :48]
    low = (np.cos(2 * np.pi * 0.3 * x) * np.cos(2 * np.pi * 0.2 * y)).astype(np.float32)  # below Nyquist
    model3 = SRNet(NetSpec("srnet", depth=1, width=4, scale=2, base_taps=3)).eval()
    model8 = SRNet(NetSpec("srnet", depth=1, width=4, scale=2, base_taps=8)).eval()
    bilinear = SRNet(NetSpec("srnet", depth=1, width=4, scale=2)).eval()
    for m in (model3, model8, bilinear):
        with torch.no_grad():
            m.tail.weight.zero_()
            m.tail.bias.zero_()
    t = torch.from_numpy(low)[None, None]
    with torch.no_grad():
        out3, out8, out_bl = (m(t)[0, 0].numpy() for m in (model3, model8, bilinear))
    pillow = np.asarray(Image.fromarray(low).resize((96, 96), Image.Resampling.LANCZOS))
    inner = (slice(12, -12), slice(12, -12))
    np.testing.assert_allclose(out3[inner], pillow[inner], atol=0.02)
    hy, hx = np.mgrid[:96, :96]
    truth = np.cos(2 * np.pi * 0.3 * ((hx + 0.5) / 2 - 0.5)) * np.cos(2 * np.pi * 0.2 * ((hy + 0.5) / 2 - 0.5))
    err = lambda out: float(np.sqrt(np.mean((out[inner] - truth[inner]) ** 2)))  # noqa: E731
    assert err(out8) < 0.5 * err(out3) and err(out8) < 0.2 * err(out_bl)


@pytest.mark.parametrize(
    "spec",
    [
        NetSpec("dncnn", depth=4, width=8, unshuffle=2, context_slices=2),
        NetSpec("dncnn", depth=4, width=8, unshuffle=2, context_slices=0),
        NetSpec("dncnn", depth=1, width=8, unshuffle=2),
        NetSpec("dncnn", depth=4, width=8, unshuffle=0),
        NetSpec("srnet", depth=2, width=8, scale=1),
        NetSpec("srnet", depth=2, width=8, scale=2, context_slices=4),
        NetSpec("srnet", depth=2, width=8, scale=2, base_taps=-1),
        NetSpec("dncnn", depth=4, width=8, unshuffle=2, base_taps=3),
        NetSpec("dncnn", depth=4, width=8, unshuffle=2, transform="log"),
        NetSpec("srnet", depth=2, width=8, scale=2, transform="asinh"),
        NetSpec("unet", depth=2, width=8),
    ],
)
def test_invalid_specs_are_refused(spec: NetSpec) -> None:
    with pytest.raises(ValueError):
        build(spec)


def test_build_names_the_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unet"):
        build(NetSpec("unet"))


def test_presets_build_and_parameter_count() -> None:
    for preset in PRESETS.values():
        model = build(preset.net)
        assert parameter_count(model) > 1000
    small, large = build(NetSpec("dncnn", depth=3, width=8)), build(NetSpec("dncnn", depth=3, width=16))
    assert parameter_count(large) > parameter_count(small)
    # 3x3 convs: (4->8) + (8->8) + (8->4), weights and biases
    assert parameter_count(small) == (4 * 8 * 9 + 8) + (8 * 8 * 9 + 8) + (8 * 4 * 9 + 4)


def test_netspec_as_dict_round_trips() -> None:
    assert NetSpec(**SRNET.as_dict()) == SRNET


# -- normalisation ---------------------------------------------------------------------------


def test_hu_window_and_round_trip() -> None:
    norm = Normalization("hu", -1024.0, 3071.0)
    values = np.random.default_rng(0).uniform(-1024, 3071, (4, 16, 16)).astype(np.float32)
    window = norm.window(values)
    assert window == (-1024.0, 4095.0)  # fixed: independent of the values
    assert norm.window(values * 0 + 5) == window
    x = Normalization.forward(values, window)
    assert x.dtype == np.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    np.testing.assert_allclose(Normalization.forward(np.array([-1024.0, 3071.0]), window), [0.0, 1.0])
    back = Normalization.inverse(x, window)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, values, atol=1e-3)


def test_percentile_window_from_values() -> None:
    norm = Normalization("percentile", 0.5, 99.5)
    values = np.arange(1001, dtype=np.float32)
    offset, span = norm.window(values)
    assert offset == pytest.approx(5.0)
    assert span == pytest.approx(990.0)
    x = Normalization.forward(values, (offset, span))
    assert float(x[5]) == pytest.approx(0.0, abs=1e-6) and float(x[995]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(Normalization.inverse(x, (offset, span)), values, atol=1e-3)


def test_percentile_window_of_a_constant_has_unit_span() -> None:
    norm = Normalization("percentile", 1.0, 99.0)
    assert norm.window(np.full((8, 8), 7.0)) == (7.0, 1.0)


@pytest.mark.parametrize(
    ("kind", "lo", "hi", "match"),
    [
        ("linear", 0.0, 1.0, "kind"),
        ("hu", 100.0, 100.0, "lo < hi"),
        ("hu", 200.0, 100.0, "lo < hi"),
        ("percentile", -1.0, 99.0, "percentile"),
        ("percentile", 1.0, 101.0, "percentile"),
    ],
)
def test_bad_normalization_is_a_manifest_error(kind: str, lo: float, hi: float, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        Normalization(kind, lo, hi)


def test_normalization_dict_round_trip_and_missing_keys() -> None:
    norm = Normalization("hu", -1024.0, 3071.0)
    assert Normalization.from_dict(norm.as_dict()) == norm
    with pytest.raises(ManifestError, match="kind, lo and hi"):
        Normalization.from_dict({"kind": "hu", "lo": -1024})
    with pytest.raises(ManifestError):
        Normalization.from_dict({"kind": "hu", "lo": "low", "hi": 1})


# -- model.toml --------------------------------------------------------------------------------


def _manifest(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "ct-denoise",
        "version": "1.0.0",
        "task": "denoise",
        "modalities": ["CT"],
        "scale": 1,
        "context_slices": 1,
        "normalization": {"kind": "hu", "lo": -1024.0, "hi": 3071.0},
        "tile": {"size": 512, "overlap": 32},
    }
    data.update(changes)
    return data


def test_manifest_from_dict_and_back() -> None:
    manifest = ModelManifest.from_dict(_manifest(net={"kind": "dncnn", "depth": 12}))
    assert manifest.task == "denoise" and manifest.modalities == ("CT",)
    assert manifest.tile == Tile(512, 32)
    assert manifest.normalization == Normalization("hu", -1024.0, 3071.0)
    assert ModelManifest.from_dict(manifest.as_dict()) == manifest


def test_manifest_defaults() -> None:
    data = _manifest()
    del data["scale"], data["context_slices"], data["tile"]
    manifest = ModelManifest.from_dict(data)
    assert manifest.scale == 1 and manifest.context_slices == 1 and manifest.tile == Tile(512, 32)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": "foo"}, "task"),
        ({"task": "denoise", "scale": 2}, "scale 1"),
        ({"task": "sr", "scale": 1}, "scale >= 2"),
        ({"context_slices": 2}, "context_slices"),
        ({"context_slices": 0}, "context_slices"),
        ({"modalities": []}, "modalities"),
        ({"tile": {"size": 8, "overlap": 0}}, "tile"),
        ({"tile": {"size": 64, "overlap": 32}}, "tile"),
        ({"normalization": {"kind": "hu", "lo": 1.0, "hi": 0.0}}, "lo < hi"),
        ({"scale": "two"}, "model.toml"),
    ],
)
def test_manifest_rejects_bad_values(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        ModelManifest.from_dict(_manifest(**changes))


def test_sr_manifest_with_context_is_accepted() -> None:
    manifest = ModelManifest.from_dict(_manifest(task="sr", scale=2, context_slices=3))
    assert manifest.scale == 2 and manifest.context_slices == 3


def test_manifest_modalities_must_be_a_list() -> None:
    """`modalities = "CT"` (a string, not a list) must be refused, not read as ("C", "T"),
    which would match no CT series."""
    with pytest.raises(ManifestError, match="modalities"):
        ModelManifest.from_dict(_manifest(modalities="CT"))


@pytest.mark.parametrize("section", ["tile", "normalization", "net"])
def test_manifest_section_that_is_not_a_table_is_a_manifest_error(section: str) -> None:
    """model.toml is read strictly: a scalar where a table belongs is refused with the reason
    (ManifestError), not an AttributeError from deep inside the reader."""
    with pytest.raises(ManifestError):
        ModelManifest.from_dict(_manifest(**{section: 512}))


@pytest.mark.parametrize("key", ["name", "version", "task", "modalities", "normalization"])
def test_manifest_missing_key_is_named(key: str) -> None:
    data = _manifest()
    del data[key]
    with pytest.raises(ManifestError, match=f"lacks '{key}'"):
        ModelManifest.from_dict(data)


def test_dncnn_offset_and_gain_only_change_the_nets_working_range() -> None:
    """(x - offset) * gain inside, noise / gain outside: with zero biases a ReLU net is
    positively homogeneous, so gain alone gives the same output; the offset changes it."""
    torch.manual_seed(0)
    plain = DnCNN(NetSpec("dncnn", depth=3, width=8, unshuffle=2))
    scaled = DnCNN(NetSpec("dncnn", depth=3, width=8, unshuffle=2, gain=20.0))
    shifted = DnCNN(NetSpec("dncnn", depth=3, width=8, unshuffle=2, offset=0.25, gain=20.0))
    scaled.load_state_dict(plain.state_dict())
    shifted.load_state_dict(plain.state_dict())
    x = 0.25 + 0.01 * torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x), scaled(x), atol=1e-6)
        assert not torch.allclose(plain(x), shifted(x), atol=1e-6)
        assert shifted(x).shape == x.shape
