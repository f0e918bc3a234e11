"""train.prune: a dncnn narrowed to fewer channels keeps what the dropped channels did not carry
exactly, and puts a dropped channel's mean contribution into the next convolution's bias."""

from __future__ import annotations

import copy

import pytest
import torch

from engines.nets import build
from engines.netspec import NetSpec
from train.prune import narrow_dncnn

pytestmark = pytest.mark.usefixtures("torch_one_thread")

WIDE = NetSpec("dncnn", depth=4, width=8, unshuffle=1)


def wide_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build(WIDE).eval()
    with torch.no_grad():
        for conv in all_convs(net):
            bias(conv).uniform_(0.1, 0.3)  # live channels, all of them
    return net


def all_convs(net: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


def bias(conv: torch.nn.Conv2d) -> torch.Tensor:
    assert conv.bias is not None
    return conv.bias


def hidden_convs(net: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return all_convs(net)[:-1]


def narrow(net: torch.nn.Module, width: int, batches: list[torch.Tensor]) -> torch.nn.Module:
    small = build(NetSpec("dncnn", depth=4, width=width, unshuffle=1)).eval()
    small.load_state_dict(narrow_dncnn(net, width, batches))
    return small


def batches() -> list[torch.Tensor]:
    return [torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(k)) for k in range(3)]


def test_channels_nothing_reads_are_the_ones_dropped_and_the_output_is_unchanged() -> None:
    net = wide_net()
    convs = all_convs(net)
    with torch.no_grad():
        for after in convs[1:]:
            after.weight[:, 5:] = 0.0  # channels 5..7 of every hidden layer feed nothing
    small = narrow(net, 5, batches())
    x = batches()[0]
    with torch.no_grad():
        assert torch.allclose(small(x), net(x), atol=1e-6)
        assert all(
            torch.equal(s.weight, w.weight[:5, : s.in_channels])
            for s, w in zip(hidden_convs(small), convs[:-1], strict=True)
        )


def test_a_constant_channel_goes_into_the_next_bias() -> None:
    """A channel with no input weights is ReLU(its bias) everywhere: the narrowed net adds what it
    fed the next layer to that layer's bias, exact away from the zero-padded border."""
    net = wide_net(1)
    convs = all_convs(net)
    with torch.no_grad():
        convs[0].weight[6:] = 0.0
        bias(convs[0])[6:] = 50.0  # constant channels 6 and 7 ...
        convs[1].weight[:, 6:] *= 1e-3  # ... read weakly enough to rank last, yet feeding ~0.1
        for conv in convs[2:]:
            conv.weight[:, 6:] = 0.0  # the later layers' spare channels feed nothing
    small = narrow(net, 6, batches())
    unfolded = copy.deepcopy(net)
    with torch.no_grad():
        bias(all_convs(unfolded)[0])[6:] = -1.0  # the same channels dropped with nothing put in their place
    x = batches()[1]
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    with torch.no_grad():
        folded_error = float((small(x) - net(x))[inner].abs().max())
        unfolded_error = float((unfolded(x) - net(x))[inner].abs().max())
    assert folded_error < 1e-3 * unfolded_error


def test_the_channels_kept_are_those_the_next_layer_reads_most() -> None:
    net = wide_net(2)
    convs = all_convs(net)
    with torch.no_grad():
        convs[1].weight[:, [1, 3]] *= 1e-4  # channels 1 and 3 of layer 0 hardly matter
    state = narrow_dncnn(net, 6, batches())
    kept = [c for c in range(8) if any(torch.equal(state["body.0.weight"][k], convs[0].weight[c]) for k in range(6))]
    assert kept == [0, 2, 4, 5, 6, 7]


def test_narrowing_needs_a_narrower_width_and_activations() -> None:
    with pytest.raises(ValueError, match="wider"):
        narrow_dncnn(wide_net(), 9, batches())
    with pytest.raises(ValueError, match="no batches"):
        narrow_dncnn(wide_net(), 4, [])
