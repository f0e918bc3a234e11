"""The two network families the node ships: a residual denoiser and a pixel-shuffle SR net.

Both are sized for the CPU budget (a 512x512 slice in about 0.15 s through ONNX Runtime on
two cores), use only standard ONNX ops (Conv, Relu, Pad, DepthToSpace/SpaceToDepth, Resize,
Add/Sub, and for the asinh transform Abs/Sign/Log/Sqrt/Exp/Mul/Div) so TensorRT's parser accepts
them, and take any height and width.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engines.netspec import ACTIVATION_STEPS, QUANTIZE, TRANSFORMS, NetSpec


class DnCNN(nn.Module):
    """DnCNN-style residual denoiser: predicts the noise and subtracts it from the centre slice.

    Working on a pixel-unshuffled image (as FFDNet does) quarters the cost per layer and
    doubles the receptive field, which suits CT's spatially correlated noise.
    """

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        if spec.depth < 2 or spec.unshuffle < 1 or spec.context_slices % 2 != 1:
            raise ValueError("dncnn needs depth >= 2, unshuffle >= 1 and an odd number of context slices")
        if spec.base_taps:
            raise ValueError("base_taps is the base interpolation of an srnet; a dncnn has none")
        if spec.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {spec.transform!r} (expected one of {', '.join(TRANSFORMS)})")
        self.asinh = spec.transform == "asinh"
        self.factor = spec.unshuffle
        self.centre = spec.context_slices // 2
        self.context = spec.context_slices
        self.noise_map = spec.noise_map
        if spec.relax < 0 or (spec.relax and not (self.asinh and spec.noise_map)):
            raise ValueError("relax (>= 0) adapts the asinh transform to the noise map: it needs both")
        self.offset, self.gain, self.relax = spec.offset, spec.gain, spec.relax
        if spec.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantize {spec.quantize!r} (expected one of {', '.join(QUANTIZE)})")
        self.quantized = spec.quantize == "int8"
        if self.quantized:
            # the log of each ReLU output's 8-bit step, in layer order (calibrate() sets them from
            # data); its name is ACTIVATION_STEPS
            self.act_log_scale = nn.Parameter(torch.zeros(spec.depth - 1))
        c_in = spec.input_channels * self.factor**2
        c_out = self.factor**2
        layers: list[nn.Module] = [nn.Conv2d(c_in, spec.width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(spec.depth - 2):
            layers += [nn.Conv2d(spec.width, spec.width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(spec.width, c_out, 3, padding=1))
        self.body = nn.Sequential(*layers)
        _init(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        pad_h, pad_w = (-h) % self.factor, (-w) % self.factor
        if self.factor > 1:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        level = x[:, self.context :] * (self.gain * NOISE_MAP_GAIN) if self.noise_map else None
        gain: torch.Tensor | float = self.gain
        if self.relax:
            gain = self.gain / (1.0 + self.relax * self.gain * x[:, self.context :])
        z = (x[:, : self.context] - self.offset) * gain
        if self.asinh:
            z = _asinh(z)
        features = z if level is None else torch.cat([z, level], dim=1)
        if self.factor > 1:
            noise = F.pixel_shuffle(self._body(F.pixel_unshuffle(features, self.factor)), self.factor)
        else:
            noise = self._body(features)
        clean = z[:, self.centre : self.centre + 1] - noise
        out = self.offset + (_sinh(clean) if self.asinh else clean) / gain
        return out[..., :h, :w]

    def _convs(self) -> list[tuple[str, nn.Conv2d, bool]]:
        """The body's convolutions in order (state name, layer, whether an int8 net quantises it:
        all but the first, which sees the image and the map, and the last, which writes the noise)."""
        convs = [(f"body.{i}", m) for i, m in enumerate(self.body) if isinstance(m, nn.Conv2d)]
        return [(name, conv, self.quantized and 0 < k < len(convs) - 1) for k, (name, conv) in enumerate(convs)]

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return self.body(x)  # type: ignore[no-any-return]  # nn.Module calls are untyped
        steps = self.act_log_scale.exp()
        convs = self._convs()
        for i, (_, conv, quantised) in enumerate(convs):
            weight, bias = conv.weight, conv.bias
            if quantised:
                weight_step = _weight_step(weight)
                weight = _round(weight / weight_step) * weight_step
                if bias is not None:  # ONNX Runtime adds it as int32, in steps of input step x weight step
                    bias_step = steps[i - 1] * weight_step.flatten()
                    bias = _round(bias / bias_step) * bias_step
            x = F.conv2d(x, weight, bias, padding=1)
            if i < len(convs) - 1:
                x = fake_quantize_activation(F.relu(x), steps[i])
        return x

    @torch.no_grad()
    def float_state(self) -> dict[str, torch.Tensor]:
        """The state of the float net that computes as this one does up to the activations'
        rounding: the quantised weights on their 8-bit grid, no activation steps. Export writes
        it as the graph ONNX Runtime's quantiser turns into the int8 one (engines.qdq)."""
        state = {k: v for k, v in self.state_dict().items() if k != ACTIVATION_STEPS}
        for name, conv, quantised in self._convs():
            if quantised:
                state[f"{name}.weight"] = fake_quantize_weight(conv.weight)
        return state

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor], quantile: float = 0.9999) -> list[float]:
        """Sets each ReLU output's 8-bit step so that `quantile` of its values on `batches` (net
        inputs) fit (the largest over the batches), as the start of quantisation-aware training
        from float weights; returns the steps."""
        if not self.quantized:
            raise ValueError("calibrate sets the scales of an int8 net")
        relus = [m for m in self.body if isinstance(m, nn.ReLU)]
        highs = [0.0] * len(relus)

        def observer(i: int) -> Any:
            def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> None:
                values = out.flatten()[:: max(1, out.numel() // 1_000_000)]  # torch.quantile takes <= 16M
                highs[i] = max(highs[i], float(torch.quantile(values, quantile)))

            return hook

        handles = [relu.register_forward_hook(observer(i)) for i, relu in enumerate(relus)]
        self.quantized = False  # the float net's activations
        try:
            for x in batches:
                self(x)
        finally:
            self.quantized = True
            for handle in handles:
                handle.remove()
        steps = [max(high, 1e-6) / 255.0 for high in highs]
        self.act_log_scale.copy_(torch.tensor(steps).log())
        return steps


def fake_quantize_activation(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """x (>= 0, after a ReLU) on the unsigned 8-bit grid of `step` (zero point 0), rounded with a
    straight-through gradient; the step learns too (LSQ, Esser et al. 2020)."""
    return _round(torch.clamp(x / step, 0.0, 255.0)) * step


def fake_quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """w on a symmetric signed 8-bit grid per output channel (step = max |w| / 127, ONNX
    Runtime's symmetric int8 weights), rounded with a straight-through gradient. A weight already
    on its grid comes back unchanged, so the weights export writes can be quantised again."""
    step = _weight_step(w)
    return _round(w / step) * step


def _weight_step(w: torch.Tensor) -> torch.Tensor:
    return w.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12) / 127.0


def _round(q: torch.Tensor) -> torch.Tensor:
    """Rounded to the nearest integer (ties to even, as ONNX QuantizeLinear); the gradient passes
    straight through."""
    return q + (torch.round(q) - q).detach()


# the noise map enters as SD x gain x this: 20 HU of CT noise (0.005 of the HU window, gain 20) is ~1
NOISE_MAP_GAIN = 10.0


# asinh and sinh from elementwise ops that every ONNX exporter and TensorRT's parser take
# (opset 17's Asinh/Sinh have no TorchScript export); the odd form keeps asinh exact for z < 0
def _asinh(z: torch.Tensor) -> torch.Tensor:
    a = z.abs()
    return torch.sign(z) * torch.log(a + torch.sqrt(a * a + 1.0))


def _sinh(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.exp(u) - torch.exp(-u))


def _init(module: nn.Module) -> None:
    """He initialisation keeps activations alive through a deep stack without batch norm (the
    default init shrinks them ~1.7x per layer and the first layers stop learning); the last
    convolution starts small so an untrained net is close to its skip path."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    with torch.no_grad():
        convs[-1].weight.mul_(0.01)


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = self.conv2(F.relu(self.conv1(x)))  # nn.Module calls are untyped
        return x + 0.2 * residual


class SRNet(nn.Module):
    """EDSR-lite: residual blocks at the input resolution, pixel shuffle to the output.

    The net learns the residual over an interpolation of the centre slice (bilinear, or a
    Lanczos windowed sinc as one fixed convolution and a pixel shuffle), so an untrained net is
    already a sensible interpolator and training only has to add what interpolation cannot.
    """

    base_kernel: torch.Tensor | None

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        if spec.scale < 2 or spec.context_slices % 2 != 1 or spec.base_taps < 0:
            raise ValueError("srnet needs scale >= 2, an odd number of context slices and base_taps >= 0")
        if spec.transform != "linear":
            raise ValueError("transform is the noise domain of a dncnn; an srnet works on the linear image")
        if spec.quantize != "none":
            raise ValueError("quantize applies to a dncnn; an srnet runs in float")
        self.scale = spec.scale
        self.taps = spec.base_taps
        kernel = lanczos_kernel(spec.scale, self.taps) if self.taps else None
        self.register_buffer("base_kernel", kernel, persistent=False)
        self.centre = spec.context_slices // 2
        self.context, self.noise_map = spec.context_slices, spec.noise_map
        # with a noise map, one more input channel after the slices: the input's noise level
        self.head = nn.Conv2d(spec.context_slices + int(spec.noise_map), spec.width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(spec.width) for _ in range(spec.depth)])
        self.tail = nn.Conv2d(spec.width, spec.scale**2, 3, padding=1)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, self.centre : self.centre + 1]
        if self.base_kernel is not None:
            padded = F.pad(centre, (self.taps,) * 4, mode="replicate")
            base = F.pixel_shuffle(F.conv2d(padded, self.base_kernel), self.scale)
        else:
            base = F.interpolate(centre, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        if self.noise_map:
            x = torch.cat([x[:, : self.context], x[:, self.context :] * NOISE_MAP_GAIN], dim=1)
        feat = self.head(x)
        feat = feat + self.blocks(feat)
        return base + F.pixel_shuffle(self.tail(feat), self.scale)


def lanczos_kernel(scale: int, taps: int) -> torch.Tensor:
    """(scale^2, 1, 2 taps + 1, 2 taps + 1) weights whose outputs, pixel-shuffled, upsample by
    `scale` with a Lanczos-`taps` kernel. Output pixel s*i + p samples the input at i + phase_p,
    phase_p = (p + 0.5) / scale - 0.5: pixel centres, as the degradations place them (DESIGN 3.6)."""
    offsets = torch.arange(-taps, taps + 1, dtype=torch.float64)
    rows = []
    for p in range(scale):
        d = offsets - ((p + 0.5) / scale - 0.5)
        k = torch.sinc(d) * torch.sinc(d / taps) * (d.abs() < taps)
        rows.append(k / k.sum())
    k1 = torch.stack(rows)  # (scale, 2 taps + 1): one 1-D kernel per phase
    k2 = k1[:, None, :, None] * k1[None, :, None, :]  # (phase y, phase x, m, n)
    return k2.reshape(scale * scale, 1, 2 * taps + 1, 2 * taps + 1).float()


def build(spec: NetSpec) -> nn.Module:
    if spec.kind == "dncnn":
        return DnCNN(spec)
    if spec.kind == "srnet":
        return SRNet(spec)
    raise ValueError(f"unknown net kind {spec.kind!r} (expected 'dncnn' or 'srnet')")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
