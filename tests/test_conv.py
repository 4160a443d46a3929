"""Periodic convolutions (gaugeflow.flows.conv) against references built independently.

torch.roll and padding_mode='circular' appear here on purpose: they are the independent
references; the library itself may only reach neighbours through gaugeflow.lattice.pad.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaugeflow.flows.conv import METHODS, ConvNet, PeriodicConv, default_method, periodic_conv
from gaugeflow.lattice import use_shift

F64 = torch.float64
TOL = 1e-12

TORCH_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def roll_reference(x, w, b):
    """y[b, o, x] = b[o] + sum_{i, a} w[o, i, a] x[b, i, x + a - r], one torch.roll per offset."""
    d = x.dim() - 2
    k = w.shape[-1]
    r = k // 2
    y = torch.zeros(x.shape[0], w.shape[0], *x.shape[2:], dtype=x.dtype)
    for a in itertools.product(range(k), repeat=d):
        xs = torch.roll(x, shifts=[r - ai for ai in a], dims=list(range(2, 2 + d)))  # xs[x] = x[x + a - r]
        y = y + torch.einsum("oi,bi...->bo...", w[(slice(None), slice(None), *a)], xs)
    return y if b is None else y + b.reshape(-1, *([1] * d))


def randomize(module, gen):
    """Weights O(1/sqrt(fan_in)) so outputs are O(1) and an absolute 1e-12 is meaningful."""
    with torch.no_grad():
        for p in module.parameters():
            fan = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan))
    return module


def rand_field(gen, batch, channels, shape):
    return torch.randn(batch, channels, *shape, generator=gen, dtype=F64)


def lattice_roll(x, shifts):
    return torch.roll(x, shifts=list(shifts), dims=list(range(2, x.dim())))


# ------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "shape, k",
    [((7,), 3), ((9,), 5), ((5, 3), 3), ((6, 4), 5), ((4, 2, 5), 3), ((3, 5, 4), 1), ((5, 4, 3), 5)],
)
def test_matches_torch_circular_conv(gen, shape, k):
    d = len(shape)
    ref = randomize(TORCH_CONV[d](3, 4, k, padding=k // 2, padding_mode="circular", dtype=F64), gen)
    conv = PeriodicConv(3, 4, k, d).to(F64)
    conv.load_state_dict(ref.state_dict())  # same parameter layout as torch's conv
    x = rand_field(gen, 2, 3, shape)
    y = conv(x)
    assert y.shape == (2, 4, *shape) and y.dtype == F64
    torch.testing.assert_close(y, ref(x), rtol=0, atol=TOL)
    assert y.abs().max() > 0.1  # a real signal, not an all-zero agreement


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, k, bias",
    [((4, 2, 6, 3), 3, True), ((3, 4, 2, 5), 3, False), ((3, 2, 4, 3), 5, True), ((3, 2, 4, 2, 3), 3, True)],
)
def test_matches_roll_reference_4d_5d(gen, shape, k, bias, method):
    d = len(shape)
    conv = randomize(PeriodicConv(2, 3, k, d, bias=bias, method=method).to(F64), gen)
    assert conv.weight.shape == (3, 2, *([k] * d))
    x = rand_field(gen, 2, 2, shape)
    y = conv(x)
    assert y.shape == (2, 3, *shape)
    torch.testing.assert_close(y, roll_reference(x, conv.weight, conv.bias), rtol=0, atol=TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, k",
    [((2,), 3), ((1,), 3), ((2,), 5), ((1, 3), 3), ((2, 2), 5), ((2, 1, 3), 3), ((2, 1, 3, 2), 3), ((2, 1, 2, 1), 5),
     ((1, 2, 1, 2, 1), 3)],
)
def test_extents_smaller_than_kernel(gen, shape, k, method):
    # the halo wraps around the lattice more than once; every image must be the right site
    d = len(shape)
    conv = randomize(PeriodicConv(2, 3, k, d, method=method).to(F64), gen)
    x = rand_field(gen, 3, 2, shape)
    torch.testing.assert_close(conv(x), roll_reference(x, conv.weight, conv.bias), rtol=0, atol=TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5, 4), (4, 3, 5), (4, 2, 3, 5), (3, 2, 4, 2, 3)])
def test_translation_equivariance(gen, shape, method):
    d = len(shape)
    net = randomize(ConvNet(2, 3, hidden=(4, 5), ndim=d, activation="tanh", method=method).to(F64), gen)
    x = rand_field(gen, 2, 2, shape)
    y = net(x)
    assert y.abs().max() > 0.1
    for shifts in [(1,) + (0,) * (d - 1), tuple(range(1, d + 1)), tuple(-s for s in shape[::-1])[:d]]:
        torch.testing.assert_close(net(lattice_roll(x, shifts)), lattice_roll(y, shifts), rtol=0, atol=TOL)
    # and the comparison can fail: the output does move with the input
    assert not torch.allclose(net(lattice_roll(x, (1,) + (0,) * (d - 1))), y)


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape", [(5, 3), (3, 4, 2)])
def test_gradients_match_torch_conv(gen, shape):
    d = len(shape)
    ref = randomize(TORCH_CONV[d](2, 3, 3, padding=1, padding_mode="circular", dtype=F64), gen)
    conv = PeriodicConv(2, 3, 3, d).to(F64)
    conv.load_state_dict(ref.state_dict())
    x = rand_field(gen, 2, 2, shape)
    g = rand_field(gen, 2, 3, shape)
    grads = []
    for m in (ref, conv):
        xi = x.clone().requires_grad_()
        m.zero_grad()
        m(xi).backward(g)
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", [(4, 2, 3, 3), (2, 3, 1, 2, 3)])
def test_gradients_match_between_implementations(gen, shape):
    d = len(shape)
    x = rand_field(gen, 2, 2, shape)
    w = torch.randn(3, 2, *([3] * d), generator=gen, dtype=F64) / math.sqrt(2 * 3**d)
    b = torch.randn(3, generator=gen, dtype=F64)
    g = rand_field(gen, 2, 3, shape)

    def grads(fn):
        ts = [t.clone().requires_grad_() for t in (x, w, b)]
        fn(*ts).backward(g)
        return [t.grad for t in ts]

    expect = grads(roll_reference)
    for method in METHODS:
        for a, e in zip(grads(lambda *t, m=method: periodic_conv(*t, method=m)), expect):
            torch.testing.assert_close(a, e, rtol=0, atol=TOL)


def test_gradcheck_4d(gen):
    x = rand_field(gen, 1, 2, (2, 3, 1, 2)).requires_grad_()
    w = torch.randn(2, 2, 3, 3, 3, 3, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: periodic_conv(*t), (x, w, b))


# -------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("ndim", [1, 2, 4])
def test_convnet_zero_init_is_exactly_zero(gen, ndim):
    shape = (4, 3, 2, 3)[:ndim]
    net = ConvNet(2, 3, hidden=(8, 8), ndim=ndim, zero_init=True).to(F64)
    x = rand_field(gen, 2, 2, shape)
    y = net(x)
    assert y.shape == (2, 3, *shape)
    assert torch.equal(y, torch.zeros_like(y))
    # only the last layer is zeroed: the rest is live, and the zeros can train away
    convs = net.convs
    assert len(convs) == 3 and all(c.weight.abs().sum() > 0 for c in convs[:-1])
    (net(x) * rand_field(gen, 2, 3, shape)).sum().backward()
    assert convs[-1].weight.grad.abs().sum() > 0
    assert not torch.equal(ConvNet(2, 3, hidden=(8, 8), ndim=ndim).to(F64)(x), torch.zeros_like(y))


def test_convnet_structure_and_activations(gen):
    x = rand_field(gen, 2, 1, (4, 4))
    for act in ("leaky_relu", "tanh", "silu", "gelu"):
        net = ConvNet(1, 2, hidden=(3,), activation=act, final_activation="tanh").to(F64)
        y = net(x)
        assert y.shape == (2, 2, 4, 4) and y.abs().max() < 1  # tanh at the end
    net = ConvNet(1, 2, hidden=(), ndim=2)
    assert len(net.convs) == 1 and len(net.net) == 1  # no activation after the last layer
    net = ConvNet(2, 5, hidden=(6, 7), kernel_size=5, ndim=3)
    assert [tuple(c.weight.shape) for c in net.convs] == [(6, 2, 5, 5, 5), (7, 6, 5, 5, 5), (5, 7, 5, 5, 5)]
    with pytest.raises(ValueError, match="activation"):
        ConvNet(1, 1, activation="relu6")
    with pytest.raises(ValueError, match="activation"):
        ConvNet(1, 1, hidden=(), final_activation="sigmoid")


# ------------------------------------------------------------------------------ module details


@pytest.mark.parametrize("d", [1, 2, 3])
def test_initialisation_is_torchs(d):
    torch.manual_seed(7)
    ref = TORCH_CONV[d](3, 5, 3)
    torch.manual_seed(7)
    conv = PeriodicConv(3, 5, 3, d)
    assert torch.equal(conv.weight, ref.weight) and torch.equal(conv.bias, ref.bias)


def test_initialisation_4d_bound():
    conv = PeriodicConv(4, 6, 3, 4)
    bound = 1 / math.sqrt(4 * 3**4)  # kaiming_uniform(a=sqrt(5)) bound, as torch's conv
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    assert conv.bias.abs().max() <= bound
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert "bias" not in PeriodicConv(4, 6, 3, 4, bias=False).state_dict()


@pytest.mark.parametrize("cin, ndim", [(2, 4), (16, 4), (2, 5), (3, 2)])
def test_float32_agrees_with_float64(gen, cin, ndim):
    # float32 takes another default method than float64 (fold or slices vs outfold)
    conv = PeriodicConv(cin, 3, 3, ndim)
    x = rand_field(gen, 2, cin, (3, 2, 4, 3, 2)[:ndim])
    y32 = conv(x.float())
    assert y32.dtype == torch.float32
    y64 = conv.to(F64)(x)
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=1e-5)


def test_default_method_follows_the_benchmark():
    assert default_method(torch.float32, 2, 3, 4) == "fold"  # first layer: fold 2 channels into 6
    assert default_method(torch.float32, 16, 3, 4) == "fold"
    assert default_method(torch.float32, 32, 3, 4) == "slices"  # hidden layer
    assert default_method(torch.float32, 16, 3, 5) == "slices"  # 5d folds k^2 = 9 offsets
    assert default_method(torch.float32, 2, 3, 5) == "fold"
    assert default_method(torch.float64, 32, 3, 4) == "outfold"
    assert default_method(torch.float64, 2, 3, 4) == "slices"
    for d in (4, 5):
        for dtype in (torch.float32, torch.float64):
            assert default_method(dtype, 3, 3, d) in METHODS
    x = torch.randn(1, 8, 2, 3, 2, 2, dtype=F64)
    w = torch.randn(1, 8, 3, 3, 3, 3, dtype=F64)
    assert torch.equal(periodic_conv(x, w, method="auto"), periodic_conv(x, w, method="outfold"))
    assert torch.equal(periodic_conv(x, w), periodic_conv(x, w, method="outfold"))


@pytest.mark.parametrize("method", METHODS)
def test_stays_on_the_input_device(method):
    # the meta device has no data: any tensor made on the CPU along the way would fail here
    net = ConvNet(2, 3, hidden=(4,), ndim=4, method=method).to("meta")
    y = net(torch.empty(2, 2, 3, 2, 4, 3, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 3, 3, 2, 4, 3)


def test_rejects_bad_arguments():
    for k in (2, 0, -1, 2.5):
        with pytest.raises(ValueError, match="kernel_size"):
            PeriodicConv(1, 1, k, 2)
    with pytest.raises(ValueError, match="ndim"):
        PeriodicConv(1, 1, 3, 0)
    with pytest.raises(ValueError, match="method"):
        PeriodicConv(1, 1, 3, 4, method="fft")
    with pytest.raises(ValueError, match="method"):
        periodic_conv(torch.zeros(1, 1, 2, 2, 2, 2), torch.zeros(1, 1, 3, 3, 3, 3), method="fft")
    with pytest.raises(ValueError, match="odd"):
        periodic_conv(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        periodic_conv(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 3, 3, 3))
    conv = PeriodicConv(2, 1, 3, 3)
    with pytest.raises(ValueError, match="expected input"):
        conv(torch.zeros(1, 3, 4, 4, 4))  # wrong channel count
    with pytest.raises(ValueError, match="expected input"):
        conv(torch.zeros(1, 2, 4, 4))  # 2d field into a 3d conv


# ------------------------------------------------------------ halos come only from lattice.pad


def _periodic_halo(field, mu, width, lead):
    """A test-only periodic halo (gather with wrapped indices), standing in for a halo exchange."""
    dim = lead + mu
    n = field.shape[dim]
    idx = torch.arange(-width, n + width, device=field.device) % n
    return field.index_select(dim, idx)


def _no_shift(field, mu, n):
    raise AssertionError("a convolution must not call shift()")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 2)])
def test_use_shift_routes_the_halo(gen, shape, method):
    d = len(shape)
    net = randomize(ConvNet(2, 2, hidden=(3,), ndim=d, method=method).to(F64), gen)
    x = rand_field(gen, 2, 2, shape)
    expect = net(x)
    calls = []

    def spy(field, mu, width, lead):
        calls.append((mu, width, lead))
        return _periodic_halo(field, mu, width, lead)

    with use_shift(_no_shift, spy):
        y = net(x)
    # two layers, each padding every lattice axis once with its kernel radius, channels-first
    assert calls == [(mu, 1, 2) for mu in range(d)] * 2
    torch.testing.assert_close(y, expect, rtol=0, atol=TOL)

    # a different halo (zeros: open boundaries) must change the result exactly as torch's
    # zero-padded conv predicts, so nothing else supplies the neighbours
    def zero_halo(field, mu, width, lead):
        calls.append(mu)
        z = torch.zeros_like(field.narrow(lead + mu, 0, 1)).expand(
            *field.shape[: lead + mu], width, *field.shape[lead + mu + 1 :]
        )
        return torch.cat([z, field, z], dim=lead + mu)

    conv = net.convs[0]
    with use_shift(_no_shift, zero_halo):
        y_open = conv(x)
    xp = F.pad(x, [1, 1] * d)  # zero padding, the open-boundary reference
    ref = sum(
        torch.einsum(
            "oi,bi...->bo...",
            conv.weight[(slice(None), slice(None), *a)],
            xp[(slice(None), slice(None), *(slice(ai, ai + s) for ai, s in zip(a, shape)))],
        )
        for a in itertools.product(range(3), repeat=d)
    ) + conv.bias.reshape(-1, *([1] * d))
    torch.testing.assert_close(y_open, ref, rtol=0, atol=TOL)
    assert not torch.allclose(y_open, conv(x))
