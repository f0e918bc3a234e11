"""An int8 denoiser (NetSpec.quantize): trained quantisation-aware (engines/nets.py), exported as a
QDQ graph (engines/qdq.py) that ONNX Runtime runs with integer convolutions, read back by the torch
backend and by a fine-tune."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engines import qdq
from engines.manifest import load
from engines.nets import build, fake_quantize_activation, fake_quantize_weight
from engines.netspec import ACTIVATION_STEPS, NetSpec
from engines.registry import EngineOptions, open_engine
from engines.torch_backend import TorchEngine
from train.export import QUANTISED_TOLERANCE, TOLERANCE, ExportMismatch, check_round_trip, export, graph_of
from train.loop import RunConfig, net_from_checkpoint, train
from train.presets import PRESETS, with_overrides

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# as ct-denoise ships it, small: asinh with a relaxed gain and a noise map, on an unshuffled image
NET = NetSpec(
    "dncnn", depth=4, width=8, unshuffle=2, offset=0.25, gain=20.0, transform="asinh", noise_map=True, relax=2.0
)


def _train(out: Path, net: NetSpec, init_from: Path | None = None) -> Path:
    preset = with_overrides(
        PRESETS["ct-denoise"], net=net, phantoms=2, phantom_size=64, epochs=1, steps_per_epoch=3, batch=2, patch=32
    )
    return train(RunConfig(preset, out, workers=1, init_from=init_from))


@pytest.fixture(scope="module")
def float_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("float")
    export(_train(root / "run", NET), root / "pkg")
    return root / "pkg"


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory: pytest.TempPathFactory, float_package: Path) -> tuple[Path, Path]:
    """A float package fine-tuned quantised (its activation steps calibrated), and its package."""
    root = tmp_path_factory.mktemp("int8")
    checkpoint = _train(root / "run", replace(NET, quantize="int8"), init_from=float_package)
    export(checkpoint, root / "pkg")
    return checkpoint, root / "pkg"


def _input(batch: int = 1, size: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = 0.25 + 0.05 * rng.standard_normal((batch, 1, size, size))
    level = np.full((batch, 1, size, size), 20 / 4095)
    return np.concatenate([image, level], axis=1).astype(np.float32)


def test_weights_are_on_a_symmetric_8_bit_grid_per_channel() -> None:
    w = torch.randn(6, 4, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    q = fake_quantize_weight(w)
    steps = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    levels = q / steps
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.abs().max() <= 127 + 1e-4
    assert (q - w).abs().max() <= steps.max() / 2 + 1e-6
    assert torch.equal(fake_quantize_weight(q), q)  # export quantises the grid values again: unchanged


def test_activations_round_clip_and_teach_their_step() -> None:
    step = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.0, 0.04, 0.26, 30.0])
    y = fake_quantize_activation(x, step)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.3, 25.5]))  # 25.5 = 255 steps: clipped
    y.sum().backward()  # type: ignore[no-untyped-call]
    assert step.grad is not None and float(step.grad) != 0.0


def test_a_float_net_refuses_calibration_and_an_srnet_refuses_int8() -> None:
    with pytest.raises(ValueError, match="int8"):
        build(NET).calibrate([torch.zeros(1, 2, 16, 16)])  # type: ignore[operator]
    with pytest.raises(ValueError, match="srnet"):
        build(NetSpec("srnet", depth=1, width=8, unshuffle=1, scale=2, quantize="int8"))
    with pytest.raises(ValueError, match="quantize"):
        build(replace(NET, quantize="int4"))


def test_the_fine_tune_calibrates_the_steps_from_data(int8_run: tuple[Path, Path]) -> None:
    state = torch.load(int8_run[0], map_location="cpu", weights_only=False)
    steps = state["model"][ACTIVATION_STEPS].exp()
    assert steps.shape == (NET.depth - 1,)
    assert bool((steps < 0.5).all()) and bool((steps > 1e-5).all())  # from the activations, not the initial 1
    assert state["net"]["quantize"] == "int8"


def test_the_package_is_a_qdq_graph_with_int8_weights_between_first_and_last(int8_run: tuple[Path, Path]) -> None:
    graph = onnx.load(str(int8_run[1] / "model.onnx")).graph
    init = {i.name: i for i in graph.initializer}
    quantised = sorted(n for n in init if n.endswith(".weight" + qdq.QUANTISED_SUFFIX))
    assert quantised == [f"body.{2 * i}.weight_quantized" for i in range(1, NET.depth - 1)]
    assert all(init[n].data_type == onnx.TensorProto.INT8 for n in quantised)
    assert {"body.0.weight", f"body.{2 * NET.depth - 2}.weight"} <= set(init)  # first and last stay float
    assert init["body.0.weight"].data_type == onnx.TensorProto.FLOAT
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == NET.depth - 1
    assert load(int8_run[1]).net["quantize"] == "int8"


def test_onnx_runtime_fuses_integer_convolutions(int8_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The speed comes from ONNX Runtime replacing each DequantizeLinear -> Conv -> QuantizeLinear
    by one integer convolution: its optimised graph must hold them."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(int8_run[1] / "model.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimised.onnx")).graph.node]
    assert ops.count("QLinearConv") == NET.depth - 2, ops


def test_onnx_runtime_matches_the_quantisation_aware_torch_net(int8_run: tuple[Path, Path]) -> None:
    model = net_from_checkpoint(torch.load(int8_run[0], map_location="cpu", weights_only=False))
    x = _input(2, 64)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(int8_run[1] / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {"input": x})
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) <= QUANTISED_TOLERANCE
    assert float(np.abs(got - expected).mean()) <= TOLERANCE  # a step boundary's rounding is rare


def test_the_export_check_refuses_another_int8_graph(int8_run: tuple[Path, Path]) -> None:
    state = torch.load(int8_run[0], map_location="cpu", weights_only=False)
    model, spec = net_from_checkpoint(state), NetSpec(**state["net"])
    assert check_round_trip(model, graph_of(model, spec), spec) <= QUANTISED_TOLERANCE
    other = net_from_checkpoint(state)
    with torch.no_grad():
        other.body[-1].weight.add_(0.05)  # type: ignore[index, union-attr]  # the last layer starts near zero in a tiny run: move it off
    with pytest.raises(ExportMismatch, match="differs from torch"):
        check_round_trip(model, graph_of(other, spec), spec)


def test_the_package_reads_back_as_the_trained_state(int8_run: tuple[Path, Path]) -> None:
    trained = torch.load(int8_run[0], map_location="cpu", weights_only=False)["model"]
    state = qdq.state_of(onnx.load(str(int8_run[1] / "model.onnx")).graph)
    assert set(trained) <= set(state)
    np.testing.assert_allclose(state[ACTIVATION_STEPS], trained[ACTIVATION_STEPS].numpy(), rtol=1e-6)
    for name in (f"body.{2 * i}.weight" for i in range(1, NET.depth - 1)):
        np.testing.assert_array_equal(state[name], fake_quantize_weight(trained[name]).numpy())
    np.testing.assert_array_equal(state["body.0.weight"], trained["body.0.weight"].numpy())
    steps = trained[ACTIVATION_STEPS].exp()
    for i in range(1, NET.depth - 1):  # the bias as the torch net rounds it: in input step x weight step
        weight, bias = trained[f"body.{2 * i}.weight"], trained[f"body.{2 * i}.bias"]
        bias_step = steps[i - 1] * weight.abs().amax(dim=(1, 2, 3)) / 127
        np.testing.assert_allclose(
            state[f"body.{2 * i}.bias"], (torch.round(bias / bias_step) * bias_step).numpy(), rtol=1e-5, atol=1e-9
        )


def test_the_torch_backend_runs_the_int8_package(int8_run: tuple[Path, Path]) -> None:
    torch_engine = open_engine(int8_run[1], EngineOptions(backend="torch", device="cpu"))
    ort_engine = open_engine(int8_run[1], EngineOptions(backend="onnxruntime", device="cpu"))
    x = _input(2, 40, seed=3)
    got, expected = torch_engine.infer(x), ort_engine.infer(x)
    assert float(np.abs(got - expected).max()) <= QUANTISED_TOLERANCE
    # asked for fp16 (the GPU default), it keeps float32: the steps would underflow in half precision
    half = TorchEngine(load(int8_run[1]), int8_run[1] / "model.onnx", device="cpu", fp16=True)
    assert float(np.abs(half.infer(x) - expected).max()) <= QUANTISED_TOLERANCE


def test_an_int8_checkpoint_fine_tunes_a_float_net(int8_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Its activation steps are dropped; the float net starts from its weights."""
    checkpoint = _train(tmp_path / "float", NET, init_from=int8_run[0])
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert ACTIVATION_STEPS not in state["model"] and state["net"]["quantize"] == "none"


def test_an_int8_package_fine_tunes_with_its_steps(int8_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A quantised package as a source keeps its learnt steps (no calibration over them)."""
    source = torch.load(int8_run[0], map_location="cpu", weights_only=False)["model"][ACTIVATION_STEPS]
    preset = with_overrides(
        PRESETS["ct-denoise"],
        net=replace(NET, quantize="int8"),
        phantoms=2,
        phantom_size=64,
        epochs=1,
        steps_per_epoch=1,
        batch=2,
        patch=32,
        lr=1e-12,
    )
    checkpoint = train(RunConfig(preset, tmp_path / "again", workers=1, init_from=int8_run[1]))
    steps = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"][ACTIVATION_STEPS]
    np.testing.assert_allclose(steps.numpy(), source.numpy(), rtol=1e-4)


def test_a_narrower_int8_net_from_an_int8_source_is_calibrated_again(
    int8_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Channels chosen on the float activations (the pruning hooks see no quantised forward),
    then the narrower net's steps calibrated on its own activations."""
    checkpoint = _train(tmp_path / "narrow", replace(NET, quantize="int8", width=4), init_from=int8_run[0])
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    assert state["body.0.weight"].shape[0] == 4
    assert bool((state[ACTIVATION_STEPS].exp() < 0.5).all())
