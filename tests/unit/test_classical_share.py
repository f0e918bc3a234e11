"""An sr model's `classical_share` (engines.pipeline.classical_sr): the output mixes the net's
with Lanczos under the same clamp and consistency, on the shipped ct-sr2 package."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engines.manifest import ManifestError, ModelManifest, load
from engines.pipeline import classical_sr, enhance_volume, resize
from engines.registry import EngineOptions, open_engine
from tests.helpers import REPO


def ct_low(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = np.full((48, 48), -1000.0, np.float32)
    low[8:40, 8:40] = 40.0 + rng.normal(0, 15, (32, 32))
    low[20:28, 20:28] = 900.0  # bone: a sharp edge
    return low[None]


def test_the_classical_estimate_is_lanczos_clamped_and_consistent() -> None:
    low = ct_low()
    plain = classical_sr(low, 2, clamp=False, consistency=0.0)
    assert np.array_equal(plain[0], resize(low[0], 2))
    safe = classical_sr(low, 2, clamp=True, consistency=1.0)
    blocks = safe[0].reshape(48, 2, 48, 2).mean(axis=(1, 3))
    assert np.allclose(blocks, low[0], atol=1e-3)  # its 2x2 block means reproduce the input


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_the_output_is_the_share_weighted_mix_and_stays_consistent(share: float) -> None:
    engine = open_engine(REPO / "models" / "ct-sr2", EngineOptions(backend="onnxruntime", device="cpu", threads=1))
    low = ct_low(1)
    shipped = engine.manifest
    engine.manifest = dataclasses.replace(shipped, classical_share=0.0)  # type: ignore[misc]
    net = enhance_volume(engine, low)
    engine.manifest = dataclasses.replace(shipped, classical_share=share)  # type: ignore[misc]
    mixed = enhance_volume(engine, low)
    classical = classical_sr(low, 2, engine.manifest.clamp_to_input, engine.manifest.consistency)
    assert np.allclose(mixed, (1 - share) * net + share * classical, atol=1e-3)
    blocks = mixed[0].reshape(48, 2, 48, 2).mean(axis=(1, 3))
    assert np.allclose(blocks, low[0], atol=1e-2)  # both parts are consistent, so is the mix


def test_classical_share_is_for_sr_models_within_0_and_1() -> None:
    sr = load(REPO / "models" / "ct-sr2").as_dict()
    for bad in (-0.1, 1.5):
        with pytest.raises(ManifestError, match="classical_share"):
            ModelManifest.from_dict({**sr, "classical_share": bad})
    denoise = load(REPO / "models" / "ct-denoise").as_dict()
    with pytest.raises(ManifestError, match="classical_share"):
        ModelManifest.from_dict({**denoise, "classical_share": 0.5})
