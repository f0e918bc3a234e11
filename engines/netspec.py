"""The architecture of a shipped net (engines/nets.py), as model.toml's [net] table and a
training checkpoint record it, without importing torch: the node's CLI and the trainer's
presets name nets where torch need not be installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRANSFORMS = ("linear", "asinh")  # dncnn: the domains a denoiser may remove the noise in
QUANTIZE = ("none", "int8")  # dncnn: how the convolutions between the first and the last compute
ACTIVATION_STEPS = "act_log_scale"  # an int8 dncnn's parameter: the log of each ReLU output's step


@dataclass(frozen=True)
class NetSpec:
    """Architecture of a model; stored in checkpoints and model.toml so a net can be rebuilt."""

    kind: str = "dncnn"  # "dncnn" (denoise) or "srnet" (super-resolution)
    depth: int = 10  # dncnn: convolutions; srnet: residual blocks
    width: int = 48
    context_slices: int = 1
    unshuffle: int = 2  # dncnn: pixel-unshuffle factor (FFDNet-style), 1 = full resolution
    scale: int = 1  # srnet: upscaling factor
    offset: float = 0.0  # dncnn: the net sees (x - offset) * gain: CT noise is ~0.005 of the HU window,
    gain: float = 1.0  # so centring on water and amplifying gives the convolutions signals of order one
    # srnet: what the net's residual is added to: 0 = bilinear upsampling, a > 0 = a Lanczos-a
    # windowed sinc (a = 8 comes close to exact zero-filled k-space interpolation, which is
    # what a k-space-truncated MR image calls for)
    base_taps: int = 0
    # dncnn: the domain the noise is predicted and removed in. "linear": z = (x - offset) * gain;
    # "asinh": u = asinh(z), linear within about one unit of the offset (soft tissue for CT) and
    # logarithmic beyond it, so a 1000 HU air or bone edge is a step of ~2.3 units, not 5, beside
    # 0.1 units of noise; the output is offset + sinh(u - noise) / gain
    transform: str = "linear"
    # dncnn: one more input channel, the series' estimated noise SD (normalised), as FFDNet's
    # noise map: the net is told how much to remove instead of guessing it (DESIGN 3.4)
    noise_map: bool = False
    # dncnn with asinh and a noise map: the gain is gain / (1 + relax * gain * level), so the
    # transform turns nearly linear where the noise itself spans its curved range (a 240 HU
    # noise SD is 1.2 units at gain 20, where asinh skews the noise and the net must learn
    # the mean's correction); 0 = the fixed gain
    relax: float = 0.0
    # dncnn: "int8" runs every convolution but the first and the last on 8-bit activations (one
    # learnt scale per layer, zero point 0 after the ReLU) and 8-bit weights (symmetric, one scale
    # per output channel), as ONNX Runtime runs the QDQ graph export writes (the convolutions about 2.5x
    # faster on a CPU with VNNI); trained so (quantisation-aware, engines/nets.py), although the
    # precision lost is mostly the activations' (models/README.md: 0.2-0.9 dB, most at low noise)
    quantize: str = "none"

    @property
    def input_channels(self) -> int:
        return self.context_slices + int(self.noise_map)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
