"""train.export: checkpoint -> model.onnx + model.toml, checked against torch."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from core.errors import ManifestError, UsageError
from engines.manifest import Tile, load
from engines.nets import build
from engines.netspec import NetSpec
from engines.normalization import Normalization
from train.export import OPSET, TOLERANCE, ExportMismatch, check_round_trip, export, onnx_bytes
from train.loop import RunConfig, net_from_checkpoint, train
from train.presets import APPLIES_TO, PRESETS, with_overrides

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@dataclass(frozen=True)
class Exported:
    checkpoint: Path
    package: Path
    state: dict[str, Any]


def _export(root: Path, name: str, net: NetSpec, command: str) -> Exported:
    preset = with_overrides(
        PRESETS[name], net=net, phantoms=2, phantom_size=64, epochs=1, steps_per_epoch=3, batch=2, patch=32
    )
    checkpoint = train(RunConfig(preset, root / "run", workers=1, command=command))
    export(checkpoint, root / "pkg")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return Exported(checkpoint, root / "pkg", state)


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export(
        tmp_path_factory.mktemp("mr-denoise"),
        "mr-denoise",
        NetSpec("dncnn", depth=3, width=8, unshuffle=2),
        "enhance-node train --preset mr-denoise",
    )


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A 2.5-D (3 context slices) x2 SR net on a windowed-sinc base, as mr-sr2 ships."""
    net = NetSpec("srnet", depth=1, width=8, unshuffle=1, scale=2, context_slices=3, base_taps=3)
    return _export(tmp_path_factory.mktemp("mr-sr2"), "mr-sr2", net, "enhance-node train --preset mr-sr2")


@pytest.fixture(scope="module")
def asinh_denoiser(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A denoiser that removes the noise in the asinh domain, as ct-denoise ships."""
    net = NetSpec("dncnn", depth=3, width=8, unshuffle=2, offset=0.25, gain=20.0, transform="asinh")
    return _export(tmp_path_factory.mktemp("asinh"), "mr-denoise", net, "enhance-node train --preset mr-denoise")


@pytest.fixture(params=["denoiser", "asinh_denoiser", "upscaler"])
def exported(request: pytest.FixtureRequest) -> Exported:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


def _run(package: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(["output"], {"input": x})
    return y  # type: ignore[no-any-return]


# --- model.toml -------------------------------------------------------------------------------


def test_denoiser_manifest(denoiser: Exported) -> None:
    m = load(denoiser.package)
    assert m.name == "mr-denoise" and m.version == "1.0.0"
    assert m.task == "denoise" and m.scale == 1
    assert m.modalities == ("MR",)
    assert m.context_slices == 1
    assert m.normalization == Normalization("percentile", 0.5, 99.5)
    assert m.tile == Tile(*PRESETS["mr-denoise"].tile)
    assert m.net == denoiser.state["net"]
    assert m.applies_to == APPLIES_TO["MR"]  # what the node may process with it (issue 18)


def test_sr_manifest(upscaler: Exported) -> None:
    m = load(upscaler.package)
    assert m.name == "mr-sr2"
    assert m.task == "sr" and m.scale == 2
    assert m.context_slices == 3
    assert m.tile == Tile(256, 16)
    assert m.net["kind"] == "srnet" and m.net["context_slices"] == 3


def test_manifest_records_the_onnx_files_sha256(exported: Exported) -> None:
    digest = hashlib.sha256((exported.package / "model.onnx").read_bytes()).hexdigest()
    assert load(exported.package).onnx_sha256 == digest


def test_manifest_records_training_provenance(exported: Exported) -> None:
    training = load(exported.package).training
    state = exported.state
    assert training["command"] == f"enhance-node train --preset {state['preset']}"
    assert training["preset"] == state["preset"]
    assert training["epochs_done"] == state["epoch"] == 1
    assert training["epochs"] == 1 and training["steps_per_epoch"] == 3 and training["seed"] == 0
    assert training["final_train_loss"] == pytest.approx(state["history"][-1]["train_loss"])
    assert training["train_seconds"] == pytest.approx(sum(r["seconds"] for r in state["history"]), abs=0.051)
    assert "torch" in training["machine"] and "cores" in training["machine"]
    assert training["exported"]
    assert 0 <= training["onnx_vs_torch_max_abs"] <= TOLERANCE
    assert set(training["validation"]) == {"val_mse", "val_psnr", "val_psnr_input"}
    assert training["degradation"]["kind"] == PRESETS[state["preset"]].degradation.kind
    assert "net" not in training and "normalization" not in training  # stored once, at the top level


def test_export_returns_what_it_wrote(denoiser: Exported, tmp_path: Path) -> None:
    manifest = export(denoiser.checkpoint, tmp_path / "pkg", name="site-mr", version="2.1.0")
    loaded = load(tmp_path / "pkg")
    assert loaded.name == manifest.name == "site-mr"
    assert loaded.version == manifest.version == "2.1.0"
    assert loaded.onnx_sha256 == manifest.onnx_sha256
    assert loaded.as_dict() == json.loads(json.dumps(manifest.as_dict()))  # TOML has lists, not tuples


def _halved(denoiser: Exported, tmp_path: Path) -> Path:
    """A checkpoint of the denoiser's run with every weight halved."""
    halved = {**denoiser.state, "model": {k: v / 2 for k, v in denoiser.state["model"].items()}}
    torch.save(halved, tmp_path / "halved.pt")
    return tmp_path / "halved.pt"


def _computes_three_quarters(package: Path, denoiser: Exported) -> None:
    """The package computes what the denoiser's net with each weight x 0.75 computes."""
    three_quarters = {k: 0.75 * v for k, v in denoiser.state["model"].items()}
    expected = net_from_checkpoint({**denoiser.state, "model": three_quarters})
    x = np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = expected(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(package, x), want, atol=1e-4)
    assert not np.allclose(_run(package, x), _run(denoiser.package, x), atol=1e-4)


def test_several_runs_export_the_average_of_their_weights(denoiser: Exported, tmp_path: Path) -> None:
    """A model soup: the package of two runs of one net computes what a net with each weight
    averaged computes (here the second run's weights are the first's halved: 0.75 x), and
    model.toml names both runs."""
    second = _halved(denoiser, tmp_path)
    export([denoiser.checkpoint, second], tmp_path / "pkg")
    _computes_three_quarters(tmp_path / "pkg", denoiser)
    assert load(tmp_path / "pkg").training["averaged_from"] == [str(denoiser.checkpoint), str(second)]


def test_a_package_averages_with_a_run_fine_tuned_from_it(denoiser: Exported, tmp_path: Path) -> None:
    """The shipped package has no checkpoint: it joins a soup as a folder, the run named last."""
    second = _halved(denoiser, tmp_path)
    export([denoiser.package, second], tmp_path / "pkg")
    _computes_three_quarters(tmp_path / "pkg", denoiser)
    with pytest.raises(UsageError, match="name a run last"):
        export([second, denoiser.package], tmp_path / "other")


def test_a_tampered_package_in_a_soup_is_a_usage_error(denoiser: Exported, tmp_path: Path) -> None:
    package = tmp_path / "tampered"
    shutil.copytree(denoiser.package, package)
    (package / "model.onnx").write_bytes((package / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(UsageError, match="sha256"):
        export([package, denoiser.checkpoint], tmp_path / "pkg")


def test_runs_of_different_nets_are_not_averaged(denoiser: Exported, asinh_denoiser: Exported, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="runs averaged must share both"):
        export([denoiser.checkpoint, asinh_denoiser.checkpoint], tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_tampered_onnx_is_refused(denoiser: Exported, tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    shutil.copytree(denoiser.package, package)
    load(package)
    with (package / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        load(package)


# --- the ONNX graph ---------------------------------------------------------------------------


def test_onnx_graph_is_portable(exported: Exported) -> None:
    proto = onnx.load(str(exported.package / "model.onnx"))
    onnx.checker.check_model(proto)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert set(opsets) <= {"", "ai.onnx"}
    assert max(opsets.values()) >= 17 == OPSET
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # no custom ops

    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "input" and out.name == "output"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    for value in (inp, out):
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 4
        for axis in (0, 2, 3):  # batch, height, width are symbolic
            assert dims[axis].dim_param, (value.name, axis, dims[axis])
            assert not dims[axis].HasField("dim_value")
    assert inp.type.tensor_type.shape.dim[1].dim_value == exported.state["net"]["context_slices"]


@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 37, 53), (2, 64, 48)])
def test_onnx_runtime_matches_torch(exported: Exported, shape: tuple[int, int, int]) -> None:
    batch, h, w = shape
    context = exported.state["net"]["context_slices"]
    scale = exported.state["net"]["scale"]
    x = np.random.default_rng(0).uniform(0.0, 1.0, (batch, context, h, w)).astype(np.float32)
    model = net_from_checkpoint(exported.state)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = _run(exported.package, x)
    assert got.shape == expected.shape == (batch, 1, h * scale, w * scale)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_sr_output_is_twice_the_input(upscaler: Exported) -> None:
    x = np.full((1, 3, 21, 30), 0.5, np.float32)
    y = _run(upscaler.package, x)
    assert y.shape == (1, 1, 42, 60)
    # a flat image stays (nearly) flat: the net learns a residual over bilinear upsampling
    assert abs(float(y.mean()) - 0.5) < 0.1


# --- the round-trip check ---------------------------------------------------------------------


def _net(seed: int, spec: NetSpec) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(spec).eval()
    with torch.no_grad():
        for p in model.parameters():  # the last layer starts near zero: make the nets really differ
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_round_trip_of_the_same_net_passes() -> None:
    spec = NetSpec("dncnn", depth=3, width=8, unshuffle=2, context_slices=3)
    model = _net(0, spec)
    assert check_round_trip(model, onnx_bytes(model, 3), spec) <= TOLERANCE


def test_round_trip_detects_another_nets_graph() -> None:
    spec = NetSpec("dncnn", depth=3, width=8, unshuffle=2)
    a, b = _net(0, spec), _net(1, spec)
    with pytest.raises(ExportMismatch, match="differs from torch"):
        check_round_trip(a, onnx_bytes(b, 1), spec)


def test_round_trip_detects_a_shape_mismatch() -> None:
    spec = NetSpec("dncnn", depth=3, width=8, unshuffle=2)
    denoise = _net(0, spec)
    sr = _net(0, NetSpec("srnet", depth=1, width=8, unshuffle=1, scale=2))
    with pytest.raises(ExportMismatch, match="shape"):
        check_round_trip(denoise, onnx_bytes(sr, 1), spec)
