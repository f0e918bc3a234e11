"""Narrowing a trained denoiser for speed: a `dncnn` with fewer channels in every hidden layer,
started from a wider one's weights (`enhance-node train --init-from WIDE --width N`).

The multiply-adds of a hidden 3x3 convolution go with the square of the width, but ONNX
Runtime's CPU convolutions work on blocks of 16 channels, so only a width that is a multiple of
16 runs faster there (24 channels take as long as 32; 16 a third; models/README.md).

Each hidden layer keeps the N channels that feed the most into the next convolution over
training patches, ||W_next[:, j]||^2 * E[a_j^2] (a_j the channel's activation
after its ReLU): a channel that is dead (always 0) or whose outgoing weights are near 0 costs
nothing to remove. What a removed channel contributed on average, W_next[:, j] * E[a_j] summed
over the kernel, goes into the next convolution's bias, so that the narrowed net starts close to
the wide one; training then recovers the rest.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def narrow_dncnn(source: nn.Module, width: int, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of `source` (a DnCNN, engines.nets) with `width` channels in each hidden
    layer, the channels chosen on the activations the `batches` (net inputs) produce."""
    body = source.body
    if not isinstance(body, nn.Sequential):
        raise ValueError("only a dncnn (a sequential body of convolutions and ReLUs) can be narrowed")
    convs = [(i, m) for i, m in enumerate(body) if isinstance(m, nn.Conv2d)]
    hidden = convs[:-1]
    if any(conv.out_channels < width for _, conv in hidden):
        raise ValueError(f"width {width} is wider than the source's {hidden[0][1].out_channels}")
    sums: dict[int, list[torch.Tensor]] = {}  # per hidden conv: per channel, sum of a, sum of a^2, count

    def hook(index: int) -> object:
        def record(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            a = torch.relu(output.detach())  # the ReLU that follows every hidden conv
            total = sums.setdefault(index, [a.new_zeros(a.shape[1]), a.new_zeros(a.shape[1]), a.new_zeros(1)])
            total[0] += a.sum(dim=(0, 2, 3))
            total[1] += (a * a).sum(dim=(0, 2, 3))
            total[2] += a.numel() // a.shape[1]

        return record

    handles = [conv.register_forward_hook(hook(i)) for i, conv in hidden]  # type: ignore[arg-type]
    was_training = source.training
    source.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                source(batch)
    finally:
        for handle in handles:
            handle.remove()
        source.train(was_training)
    if not sums:
        raise ValueError("no batches: the channels to keep are chosen on the activations they produce")
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for (i, _), (j, _) in zip(hidden, convs[1:], strict=True):
        total, square, count = sums[i]
        outgoing = state[f"body.{j}.weight"]  # (out, in, 3, 3): input c of conv j is channel c of conv i
        score = (outgoing**2).sum(dim=(0, 2, 3)) * square
        keep = torch.argsort(score, descending=True)[:width].sort().values
        dropped = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
        dropped[keep] = False
        mean = total / count
        state[f"body.{j}.bias"] += (outgoing[:, dropped] * mean[dropped][None, :, None, None]).sum(dim=(1, 2, 3))
        state[f"body.{j}.weight"] = outgoing[:, keep]
        for name in (f"body.{i}.weight", f"body.{i}.bias"):
            state[name] = state[name][keep]
    return state
