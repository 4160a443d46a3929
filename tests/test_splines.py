"""Tests of the elementwise flow transforms in gaugeflow.flows.splines.

Correctness is checked in float64 with parameters drawn large enough that the maps are far
from the identity (asserted), so a broken inverse or Jacobian cannot pass by accident.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugeflow.flows.splines import (
    _knots,
    circular_rational_quadratic_spline,
    derivative_offset,
    ncp,
    ncp_mixture,
    rational_quadratic_spline,
    unbounded_rational_quadratic_spline,
    wrap_angle,
)

F64 = torch.float64
TWO_PI = 2 * math.pi
EPS64 = torch.finfo(F64).eps


# --------------------------------------------------------------------------- helpers
def raw(gen, *shape, scale=1.5, dtype=F64):
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def circ_dist(a, b):
    """Distance on the circle of circumference 2 pi."""
    d = torch.remainder(a - b, TWO_PI)
    return torch.minimum(d, TWO_PI - d)


def autograd_logdet(fn, x):
    """log |dy/dx| of an elementwise map by autograd (d/dx of sum(y) is the diagonal)."""
    x = x.detach().clone().requires_grad_(True)
    y, ld = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return torch.log(g.abs()), ld.detach()


def roundtrip_tol(ld, scale=1.0, eps=EPS64):
    """Attainable accuracy of x after y = f(x): rounding of y divided by f'(x) (|x|, |y| <~ scale)."""
    return 1e-10 + 32 * eps * scale * torch.exp(-ld)


def spline_params(gen, n, k, kind, scale=1.5, dtype=F64):
    nd = {"bounded": k + 1, "unbounded": k - 1, "circular": k}[kind]
    return raw(gen, n, k, scale=scale, dtype=dtype), raw(gen, n, k, scale=scale, dtype=dtype), raw(
        gen, n, nd, scale=scale, dtype=dtype
    )


def spline_fn(kind, w, h, d, inverse=False, **kw):
    f = {
        "bounded": rational_quadratic_spline,
        "unbounded": unbounded_rational_quadratic_spline,
        "circular": circular_rational_quadratic_spline,
    }[kind]
    return lambda x: f(x, w, h, d, inverse=inverse, **kw)


# --------------------------------------------------------------------------- bounded RQ spline
def test_rqs_round_trip_float64(gen):
    n, k, low, high = 4000, 8, -2.0, 3.0
    w, h, d = spline_params(gen, n, k, "bounded")
    x = low + (high - low) * torch.rand(n, generator=gen, dtype=F64)
    y, ld = rational_quadratic_spline(x, w, h, d, low=low, high=high)
    assert (y - x).abs().max() > 0.5  # strongly non-identity
    assert y.min() >= low and y.max() <= high
    xb, ldb = rational_quadratic_spline(y, w, h, d, inverse=True, low=low, high=high)
    assert torch.allclose(xb, x, atol=1e-10, rtol=0)
    # inverse logdet is minus the forward one at the point the inverse returned
    _, ld_at_xb = rational_quadratic_spline(xb, w, h, d, low=low, high=high)
    assert torch.allclose(ldb, -ld_at_xb, atol=1e-12, rtol=0)
    assert torch.allclose(ldb, -ld, atol=1e-9, rtol=0)
    # other direction
    yi, _ = rational_quadratic_spline(x, w, h, d, inverse=True, low=low, high=high)
    xf, _ = rational_quadratic_spline(yi, w, h, d, low=low, high=high)
    assert torch.allclose(xf, x, atol=1e-10, rtol=0)


def test_rqs_round_trip_extreme_parameters_at_float_precision(gen):
    # raw scale 4: bins down to the minimum size and slopes from 1e-3 to ~50; the inverse is
    # then as accurate as the conditioning allows (rounding of y over f'(x)), no worse
    n, k = 20000, 10
    w, h, d = spline_params(gen, n, k, "bounded", scale=5.0)
    x = torch.rand(n, generator=gen, dtype=F64)
    y, ld = rational_quadratic_spline(x, w, h, d)
    xb, _ = rational_quadratic_spline(y, w, h, d, inverse=True)
    # no absolute floor: a root taken from the far knot of its bin loses ~1e3 of this
    assert ((xb - x).abs() <= 16 * EPS64 * (1 + torch.exp(-ld))).all()
    yi, _ = rational_quadratic_spline(x, w, h, d, inverse=True)
    xf, _ = rational_quadratic_spline(yi, w, h, d)
    assert torch.allclose(xf, x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_rqs_logdet_matches_autograd(gen, inverse):
    n, k = 500, 7
    w, h, d = spline_params(gen, n, k, "bounded", scale=2.0)
    x = -1.0 + 3.0 * torch.rand(n, generator=gen, dtype=F64)
    auto, ld = autograd_logdet(spline_fn("bounded", w, h, d, inverse, low=-1.0, high=2.0), x)
    assert ld.shape == x.shape
    assert torch.allclose(auto, ld, atol=1e-9, rtol=0)
    assert ld.abs().max() > 0.5


def test_rqs_monotone_and_broadcast_parameters(gen):
    k = 9
    w, h, d = raw(gen, k, scale=2.0), raw(gen, k, scale=2.0), raw(gen, k + 1, scale=2.0)
    x = torch.linspace(0.0, 1.0, 20001, dtype=F64)  # one parameter set broadcast over all x
    for inverse in (False, True):
        y, ld = rational_quadratic_spline(x, w, h, d, inverse=inverse)
        assert y.shape == x.shape == ld.shape
        assert (torch.diff(y) > 0).all()
        assert torch.isfinite(ld).all()


def test_rqs_endpoints_and_knots_are_exact(gen):
    k = 6
    for dtype in (torch.float32, F64):
        w, h, d = spline_params(gen, 5, k, "bounded", scale=3.0, dtype=dtype)
        low, high = -1.5, 2.5
        x = torch.tensor([low, high], dtype=dtype).expand(5, 2).T  # (2, 5)
        for inverse in (False, True):
            y, ld = rational_quadratic_spline(x, w, h, d, low=low, high=high, inverse=inverse)
            assert (y[0] == low).all() and (y[1] == high).all()
            assert torch.isfinite(ld).all()
        # interior knots map onto interior knots
        kx, ky = _knots(w, low, high, 1e-3), _knots(h, low, high, 1e-3)
        y, _ = rational_quadratic_spline(kx.T, w, h, d, low=low, high=high)
        assert torch.allclose(y, ky.T, atol=4 * torch.finfo(dtype).eps, rtol=0)
        xb, _ = rational_quadratic_spline(ky.T, w, h, d, low=low, high=high, inverse=True)
        assert torch.allclose(xb, kx.T, atol=1e3 * torch.finfo(dtype).eps, rtol=0)


def test_rqs_batched_shapes_match_elementwise(gen):
    k = 5
    x = torch.rand(3, 4, 5, generator=gen, dtype=F64)
    w, h, d = raw(gen, 4, 1, k), raw(gen, 4, 1, k), raw(gen, 4, 1, k + 1)
    y, ld = rational_quadratic_spline(x, w, h, d)
    assert y.shape == ld.shape == (3, 4, 5)
    we, he, de = (t.expand(3, 4, 5, t.shape[-1]).reshape(-1, t.shape[-1]) for t in (w, h, d))
    ye, lde = rational_quadratic_spline(x.reshape(-1), we, he, de)
    assert torch.equal(y.reshape(-1), ye) and torch.equal(ld.reshape(-1), lde)


def test_shift_broadcasts_with_input_and_parameters(gen):
    k, m = 6, 3
    theta = torch.tensor(1.3, dtype=F64)  # one angle, parameters for 2 rows, a shift for (4, 2)
    w, h, d = raw(gen, 2, k), raw(gen, 2, k), raw(gen, 2, k)
    s, wts = mixture_params(gen, 2, m)
    shift = raw(gen, 4, 2)
    for inverse in (False, True):
        y, ld = circular_rational_quadratic_spline(theta, w, h, d, shift=shift, inverse=inverse)
        assert y.shape == ld.shape == (4, 2)
        y1, _ = circular_rational_quadratic_spline(theta, w[1], h[1], d[1], shift=shift[3, 1], inverse=inverse)
        assert torch.allclose(y[3, 1], y1, atol=1e-14, rtol=0)
        y, ld = ncp_mixture(theta, s, wts, shift=shift, inverse=inverse)
        assert y.shape == ld.shape == (4, 2)
        y1, _ = ncp_mixture(theta, s[1], wts[1], shift=shift[3, 1], inverse=inverse)
        assert torch.allclose(y[3, 1], y1, atol=1e-14, rtol=0)


def test_rqs_rejects_bad_arguments():
    x = torch.rand(4, dtype=F64)
    z = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ValueError):
        rational_quadratic_spline(x, z, z, z)  # derivatives need K+1
    with pytest.raises(ValueError):
        rational_quadratic_spline(x, z, z, torch.zeros(4, 4, dtype=F64), min_bin_width=0.5)
    with pytest.raises(TypeError):
        rational_quadratic_spline(x.float(), z, z, torch.zeros(4, 4, dtype=F64))
    with pytest.raises(ValueError):
        unbounded_rational_quadratic_spline(x, z, z, z)  # derivatives need K-1
    with pytest.raises(ValueError):
        circular_rational_quadratic_spline(x, z, z, torch.zeros(4, 4, dtype=F64))
    with pytest.raises(ValueError):
        derivative_offset(1.0)


# --------------------------------------------------------------------------- identity initialisation
@pytest.mark.parametrize("kind", ["bounded", "unbounded", "circular"])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_zero_parameters_are_the_identity(kind, k):
    nd = {"bounded": k + 1, "unbounded": k - 1, "circular": k}[kind]
    x = {
        "bounded": torch.linspace(0, 1, 1001, dtype=F64),
        "unbounded": torch.linspace(-6, 6, 1001, dtype=F64),
        "circular": torch.linspace(0, TWO_PI, 1001, dtype=F64)[:-1],
    }[kind]
    z = torch.zeros(x.shape[0], k, dtype=F64)
    zd = torch.zeros(x.shape[0], nd, dtype=F64)
    for inverse in (False, True):
        y, ld = spline_fn(kind, z, z, zd, inverse)(x)
        assert torch.allclose(y, x, atol=1e-12, rtol=0)
        assert ld.abs().max() < 1e-12


def test_derivative_parameterisation_gives_one_at_zero():
    for md in (0.0, 1e-3, 0.1):
        c = derivative_offset(md)
        assert abs(md + torch.nn.functional.softplus(torch.tensor(c, dtype=F64)).item() - 1.0) < 1e-15


def test_ncp_unit_scale_is_the_identity(gen):
    x = torch.rand(500, generator=gen, dtype=F64) * TWO_PI
    s = torch.ones(500, 4, dtype=F64)
    wts = torch.softmax(raw(gen, 500, 4), -1)
    for inverse in (False, True):
        y, ld = ncp(x, torch.ones((), dtype=F64), inverse=inverse)
        assert torch.allclose(y, x, atol=1e-12, rtol=0) and ld.abs().max() < 1e-12
        y, ld = ncp_mixture(x, s, wts, inverse=inverse, shift=torch.zeros(500, dtype=F64))
        assert torch.allclose(y, x, atol=1e-12, rtol=0) and ld.abs().max() < 1e-12


# --------------------------------------------------------------------------- unbounded spline
def test_unbounded_round_trip_and_tails(gen):
    n, k, bound = 4000, 8, 3.0
    w, h, d = spline_params(gen, n, k, "unbounded")
    x = 2.5 * bound * torch.randn(n, generator=gen, dtype=F64)
    x[:4] = torch.tensor([-bound, bound, -1e6, 1e6], dtype=F64)
    y, ld = unbounded_rational_quadratic_spline(x, w, h, d, bound=bound)
    outside = x.abs() > bound
    assert outside.sum() > 100 and (~outside).sum() > 100
    assert torch.equal(y[outside], x[outside]) and (ld[outside] == 0).all()
    assert (y[:2] == x[:2]).all()  # the ends are fixed points
    assert (y - x)[~outside].abs().max() > 0.5
    xb, ldb = unbounded_rational_quadratic_spline(y, w, h, d, bound=bound, inverse=True)
    assert torch.allclose(xb, x, atol=1e-10, rtol=0)
    assert torch.allclose(ldb, -ld, atol=1e-9, rtol=0)
    yi, _ = unbounded_rational_quadratic_spline(x, w, h, d, bound=bound, inverse=True)
    xf, _ = unbounded_rational_quadratic_spline(yi, w, h, d, bound=bound)
    assert torch.allclose(xf, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("inverse", [False, True])
def test_unbounded_logdet_matches_autograd_including_tails(gen, inverse):
    n, k = 600, 6
    w, h, d = spline_params(gen, n, k, "unbounded", scale=2.0)
    x = 3.0 * torch.randn(n, generator=gen, dtype=F64)
    auto, ld = autograd_logdet(spline_fn("unbounded", w, h, d, inverse, bound=2.0), x)
    assert torch.allclose(auto, ld, atol=1e-9, rtol=0)


def test_unbounded_is_c1_at_the_bound(gen):
    k, bound = 8, 2.0
    w, h, d = spline_params(gen, 1, k, "unbounded", scale=3.0)
    x = torch.tensor([-bound, bound, -bound + 1e-9, bound - 1e-9], dtype=F64)
    for inverse in (False, True):
        y, ld = unbounded_rational_quadratic_spline(x, w, h, d, bound=bound, inverse=inverse)
        assert ld.abs().max() < 1e-6  # slope 1 at the ends of the spline, like the tails


# --------------------------------------------------------------------------- circular spline
@pytest.mark.parametrize("with_shift", [False, True])
def test_circular_round_trip(gen, with_shift):
    n, k = 4000, 8
    w, h, d = spline_params(gen, n, k, "circular")
    shift = raw(gen, n, scale=3.0) if with_shift else None
    theta = 10.0 * torch.randn(n, generator=gen, dtype=F64)  # any real angle
    y, ld = circular_rational_quadratic_spline(theta, w, h, d, shift=shift)
    assert (y >= 0).all() and (y < TWO_PI).all()
    assert circ_dist(y, theta).max() > 0.5
    xb, ldb = circular_rational_quadratic_spline(y, w, h, d, shift=shift, inverse=True)
    assert (xb >= 0).all() and (xb < TWO_PI).all()
    assert circ_dist(xb, theta).max() < 1e-10
    assert torch.allclose(ldb, -ld, atol=1e-9, rtol=0)
    yi, _ = circular_rational_quadratic_spline(theta, w, h, d, shift=shift, inverse=True)
    xf, _ = circular_rational_quadratic_spline(yi, w, h, d, shift=shift)
    assert circ_dist(xf, theta).max() < 1e-10


@pytest.mark.parametrize("inverse", [False, True])
def test_circular_logdet_matches_autograd(gen, inverse):
    n, k = 600, 8
    w, h, d = spline_params(gen, n, k, "circular", scale=2.0)
    theta = TWO_PI * torch.rand(n, generator=gen, dtype=F64)
    auto, ld = autograd_logdet(spline_fn("circular", w, h, d, inverse, shift=0.7), theta)
    assert torch.allclose(auto, ld, atol=1e-9, rtol=0)


def test_circular_periodicity(gen):
    n, k = 300, 7
    w, h, d = spline_params(gen, n, k, "circular", scale=2.0)
    theta = TWO_PI * torch.rand(n, generator=gen, dtype=F64)
    y0, ld0 = circular_rational_quadratic_spline(theta, w, h, d)
    for m in (-2, 1, 3):
        y1, ld1 = circular_rational_quadratic_spline(theta + m * TWO_PI, w, h, d)
        assert circ_dist(y1, y0).max() < 1e-12
        assert torch.allclose(ld1, ld0, atol=1e-9, rtol=0)
    # slope at 0 equals the slope approaching 2 pi (matching end derivatives)
    for inverse in (False, True):
        fn = spline_fn("circular", w, h, d, inverse)
        a0, l0 = autograd_logdet(fn, torch.zeros(n, dtype=F64))
        # log-slopes change fast inside minimum-size bins (~1e6 per radian), hence a tiny offset
        a1, l1 = autograd_logdet(fn, torch.full((n,), TWO_PI - 1e-13, dtype=F64))
        assert torch.allclose(l0, l1, atol=1e-5, rtol=0)
        assert torch.allclose(a0, a1, atol=1e-5, rtol=0)
        assert l0.abs().max() > 0.5  # the end slope is not trivially 1
    # 0 and 2 pi are fixed without a shift
    y, _ = circular_rational_quadratic_spline(torch.zeros(n, dtype=F64), w, h, d)
    assert (y == 0).all()


def test_circular_monotone(gen):
    k = 8
    w, h, d = raw(gen, k, scale=2.0), raw(gen, k, scale=2.0), raw(gen, k, scale=2.0)
    theta = torch.linspace(0, TWO_PI, 20001, dtype=F64)[:-1]
    for inverse in (False, True):
        y, _ = circular_rational_quadratic_spline(theta, w, h, d, inverse=inverse)
        assert (torch.diff(y) > 0).all()


@pytest.mark.parametrize("slope", [-12.0, 0.0, 6.0])
def test_angles_near_two_pi_float32_stay_below_two_pi(gen, slope):
    """float32 remainder can return 2 pi exactly; every output must be in [0, 2 pi)."""
    f32 = torch.float32
    two_pi = torch.tensor(TWO_PI, dtype=f32)
    below = [two_pi]
    for _ in range(20):
        below.append(torch.nextafter(below[-1], torch.zeros((), dtype=f32)))
    others = (-1e-8, -1e-30, -0.0, 0.0, 4 * math.pi, -TWO_PI)
    theta = torch.stack(below + [torch.tensor(v, dtype=f32) for v in others])
    # the trap is real: float32 remainder returns 2 pi itself
    assert (torch.remainder(torch.tensor([-1e-8], dtype=f32), TWO_PI) == two_pi).all()
    k, n = 6, theta.shape[0]
    w, h = raw(gen, n, k, dtype=f32), raw(gen, n, k, dtype=f32)
    d = torch.full((n, k), slope, dtype=f32)  # small or large slope at the 0 = 2 pi knot
    s = torch.tensor([0.05, 1.0, 20.0], dtype=f32).expand(n, 3)
    wts = torch.full((n, 3), 1.0 / 3, dtype=f32)
    outs = [wrap_angle(theta)]
    for inverse in (False, True):
        outs.append(circular_rational_quadratic_spline(theta, w, h, d, inverse=inverse)[0])
        outs.append(circular_rational_quadratic_spline(theta, w, h, d, inverse=inverse, shift=0.5)[0])
        # a tiny negative shift takes 0 (a fixed point) to -1e-8, where remainder returns 2 pi
        outs.append(circular_rational_quadratic_spline(theta, w, h, d, inverse=inverse, shift=-1e-8)[0])
        outs.append(ncp(theta, torch.tensor(math.exp(slope / 4), dtype=f32), inverse=inverse)[0])
        outs.append(ncp_mixture(theta, s, wts, inverse=inverse)[0])
        outs.append(ncp_mixture(theta, s, wts, inverse=inverse, shift=torch.tensor(-1.0))[0])
        outs.append(ncp_mixture(theta, s, wts, inverse=inverse, shift=torch.tensor(-1e-8))[0])
    for y in outs:
        assert y.dtype == f32
        assert (y >= 0).all() and (y < two_pi).all(), y


# --------------------------------------------------------------------------- NCP
def test_ncp_matches_textbook_formula_and_inverse(gen):
    n = 2000
    x = (torch.rand(n, generator=gen, dtype=F64) * 2 - 1) * (math.pi - 1e-6)  # (-pi, pi)
    s = torch.exp(raw(gen, n))
    y, ld = ncp(x, s)
    ref = torch.remainder(2 * torch.atan(s * torch.tan(x / 2)), TWO_PI)
    assert circ_dist(y, ref).max() < 1e-12
    assert (y >= 0).all() and (y < TWO_PI).all()
    assert circ_dist(y, x).max() > 0.5
    auto, ld2 = autograd_logdet(lambda t: ncp(t, s), x)
    assert torch.allclose(auto, ld, atol=1e-10, rtol=0)
    xb, ldb = ncp(y, s, inverse=True)
    assert circ_dist(xb, x).max() < 1e-10
    assert torch.allclose(ldb, -ld, atol=1e-10, rtol=0)
    assert torch.allclose(xb, ncp(y, 1.0 / s)[0], atol=1e-12, rtol=0)  # inverse = NCP with 1/s
    auto_inv, ldi = autograd_logdet(lambda t: ncp(t, s, inverse=True), y)
    assert torch.allclose(auto_inv, ldi, atol=1e-9, rtol=0)
    # fixed points 0 and pi, slopes s and 1/s there
    fx = torch.tensor([0.0, math.pi], dtype=F64)
    yf, ldf = ncp(fx, torch.tensor(3.0, dtype=F64))
    assert torch.allclose(yf, fx, atol=1e-15, rtol=0)
    assert torch.allclose(ldf, torch.tensor([math.log(3.0), -math.log(3.0)], dtype=F64), atol=1e-14, rtol=0)


def mixture_params(gen, n, m, dtype=F64, scale=1.5):
    s = torch.exp(raw(gen, n, m, scale=scale, dtype=dtype))
    wts = torch.softmax(raw(gen, n, m, scale=2.0, dtype=dtype), -1)
    return s, wts


@pytest.mark.parametrize("with_shift", [False, True])
def test_ncp_mixture_round_trip(gen, with_shift):
    n, m = 3000, 5
    s, wts = mixture_params(gen, n, m)
    shift = raw(gen, n, scale=3.0) if with_shift else None
    theta = 10.0 * torch.randn(n, generator=gen, dtype=F64)
    theta[:3] = torch.tensor([0.0, math.pi, TWO_PI - 1e-13], dtype=F64)
    y, ld = ncp_mixture(theta, s, wts, shift=shift)
    assert (y >= 0).all() and (y < TWO_PI).all()
    assert circ_dist(y, theta).max() > 0.5
    xb, ldb = ncp_mixture(y, s, wts, shift=shift, inverse=True)
    assert (xb >= 0).all() and (xb < TWO_PI).all()
    assert circ_dist(xb, theta).max() < 1e-10
    _, ld_at_xb = ncp_mixture(xb, s, wts, shift=shift)
    assert torch.allclose(ldb, -ld_at_xb, atol=1e-12, rtol=0)
    # the root finder reaches float precision: forward(inverse(y)) == y to 1e-12
    yi, _ = ncp_mixture(theta, s, wts, shift=shift, inverse=True)
    xf, _ = ncp_mixture(yi, s, wts, shift=shift)
    assert circ_dist(xf, theta).max() < 1e-12


@pytest.mark.parametrize("inverse", [False, True])
def test_ncp_mixture_logdet_matches_autograd(gen, inverse):
    n, m = 500, 4
    s, wts = mixture_params(gen, n, m)
    theta = TWO_PI * torch.rand(n, generator=gen, dtype=F64)
    auto, ld = autograd_logdet(lambda t: ncp_mixture(t, s, wts, inverse=inverse, shift=0.3), theta)
    assert torch.allclose(auto, ld, atol=1e-9, rtol=0)
    assert ld.abs().max() > 0.5


def test_ncp_mixture_inverse_gradients_by_gradcheck(gen):
    """The implicit-function gradients of the root finder, checked by finite differences."""
    n, m = 4, 3
    y = (0.5 + 5.0 * torch.rand(n, generator=gen, dtype=F64)).requires_grad_()
    s = torch.exp(raw(gen, n, m, scale=0.8)).requires_grad_()
    wts = (0.2 + torch.rand(n, m, generator=gen, dtype=F64)).requires_grad_()
    shift = torch.full((n,), 0.1, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ncp_mixture(a[0], a[1], a[2], shift=a[3], inverse=True), (y, s, wts, shift)
    )


@pytest.mark.parametrize("kind", ["bounded", "unbounded", "circular"])
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_gradients_by_gradcheck(gen, kind, inverse):
    n, k = 3, 4
    w, h, d = (t.requires_grad_() for t in spline_params(gen, n, k, kind, scale=1.0))
    x = {
        "bounded": torch.tensor([0.13, 0.52, 0.91], dtype=F64),
        "unbounded": torch.tensor([-1.7, 0.4, 4.0], dtype=F64),
        "circular": torch.tensor([0.6, 2.9, 5.5], dtype=F64),
    }[kind].requires_grad_()
    fn = {
        "bounded": rational_quadratic_spline,
        "unbounded": unbounded_rational_quadratic_spline,
        "circular": circular_rational_quadratic_spline,
    }[kind]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, inverse=inverse), (x, w, h, d))


# --------------------------------------------------------------------------- finite gradients everywhere
def _all_grads_finite(fn, x, *params):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y, ld = fn(x, *params)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    grads = torch.autograd.grad((y + ld).sum(), [x, *params])
    return all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradients_finite_on_knots_ends_and_tails(gen, dtype, inverse):
    k = 6
    for scale in (1.0, 8.0):  # 8: saturated softmax / softplus, minimum bin sizes
        w, h = raw(gen, k, scale=scale, dtype=dtype), raw(gen, k, scale=scale, dtype=dtype)
        # bounded: ends and every knot (x-knots forward, y-knots inverse)
        knots = _knots(h if inverse else w, 0.0, 1.0, 1e-3).detach()
        x = torch.cat([knots, torch.rand(20, generator=gen, dtype=dtype)])
        d = raw(gen, k + 1, scale=scale, dtype=dtype)
        assert _all_grads_finite(
            lambda x, w, h, d: rational_quadratic_spline(x, w, h, d, inverse=inverse), x, w, h, d
        )
        # unbounded: knots, +-bound, tails, huge values; also through an outer where-mask
        knots = _knots(h if inverse else w, -3.0, 3.0, 1e-3).detach()
        x = torch.cat([knots, torch.tensor([-1e6, -3.0 - 1e-6, 3.0 + 1e-6, 50.0, 1e30], dtype=dtype)])
        d = raw(gen, k - 1, scale=scale, dtype=dtype)

        def masked(x, w, h, d):
            y, ld = unbounded_rational_quadratic_spline(x, w, h, d, inverse=inverse)
            keep = torch.arange(x.shape[0]) % 2 == 0
            return torch.where(keep, y, x), torch.where(keep, ld, torch.zeros_like(ld))

        assert _all_grads_finite(
            lambda x, w, h, d: unbounded_rational_quadratic_spline(x, w, h, d, inverse=inverse), x, w, h, d
        )
        assert _all_grads_finite(masked, x, w, h, d)
        # circular: knots, 0, 2 pi, negative and large angles
        knots = _knots(h if inverse else w, 0.0, TWO_PI, 1e-3).detach()
        x = torch.cat([knots, torch.tensor([-1e-7, TWO_PI + 1e-7, -20.0, 100.0], dtype=dtype)])
        d = raw(gen, k, scale=scale, dtype=dtype)
        assert _all_grads_finite(
            lambda x, w, h, d: circular_rational_quadratic_spline(x, w, h, d, inverse=inverse, shift=0.4),
            x, w, h, d,
        )
        # NCP and mixture at the fixed points 0, pi and at the seam, with extreme scales
        x = torch.tensor([0.0, math.pi, TWO_PI - 1e-6, -1e-7, 1.0, 4.0], dtype=dtype)
        s_raw = raw(gen, 6, 3, scale=scale / 2, dtype=dtype)
        wl = raw(gen, 6, 3, scale=scale, dtype=dtype)
        assert _all_grads_finite(lambda x, s: ncp(x, torch.exp(s[:, 0]), inverse=inverse), x, s_raw)
        assert _all_grads_finite(
            lambda x, s, wl: ncp_mixture(
                x, torch.nn.functional.softplus(s), torch.softmax(wl, -1), inverse=inverse, shift=0.2
            ),
            x, s_raw, wl,
        )


# --------------------------------------------------------------------------- float32
def test_float32_round_trips(gen):
    f32 = torch.float32
    eps = torch.finfo(f32).eps
    n, k = 2000, 8
    x01 = torch.rand(n, generator=gen, dtype=f32)
    w, h, d = spline_params(gen, n, k, "bounded", scale=1.0, dtype=f32)
    y, ld = rational_quadratic_spline(x01, w, h, d)
    assert y.dtype == ld.dtype == f32
    xb, ldb = rational_quadratic_spline(y, w, h, d, inverse=True)
    assert ((xb - x01).abs() <= roundtrip_tol(ld, eps=eps)).all()
    assert torch.allclose(ldb, -rational_quadratic_spline(xb, w, h, d)[1], atol=1e-5, rtol=0)

    x = 4.0 * torch.randn(n, generator=gen, dtype=f32)
    w, h, d = spline_params(gen, n, k, "unbounded", scale=1.0, dtype=f32)
    y, ld = unbounded_rational_quadratic_spline(x, w, h, d)
    xb, _ = unbounded_rational_quadratic_spline(y, w, h, d, inverse=True)
    assert ((xb - x).abs() <= roundtrip_tol(ld, scale=12.0, eps=eps)).all()

    theta = TWO_PI * x01
    w, h, d = spline_params(gen, n, k, "circular", scale=1.0, dtype=f32)
    y, ld = circular_rational_quadratic_spline(theta, w, h, d, shift=0.3)
    xb, _ = circular_rational_quadratic_spline(y, w, h, d, shift=0.3, inverse=True)
    assert (circ_dist(xb.double(), theta.double()) <= roundtrip_tol(ld, TWO_PI, eps).double()).all()

    s, wts = mixture_params(gen, n, 4, dtype=f32, scale=1.0)
    y, ld = ncp_mixture(theta, s, wts, shift=0.3)
    xb, ldb = ncp_mixture(y, s, wts, shift=0.3, inverse=True)
    assert xb.dtype == ldb.dtype == f32
    assert (circ_dist(xb.double(), theta.double()) <= roundtrip_tol(ld, TWO_PI, eps).double()).all()
    assert torch.allclose(ldb, -ncp_mixture(xb, s, wts, shift=0.3)[1], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- hypothesis properties
PROPS = settings(max_examples=60, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


@PROPS
@given(
    seed=seeds,
    k=st.integers(1, 12),
    xs=st.lists(st.floats(-2.0, 3.0, allow_nan=False), min_size=1, max_size=16),
)
def test_property_rqs_round_trip(seed, k, xs):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(xs, dtype=F64)
    w, h, d = spline_params(g, x.shape[0], k, "bounded", scale=2.0)
    y, ld = rational_quadratic_spline(x, w, h, d, low=-2.0, high=3.0)
    assert ((y >= -2.0) & (y <= 3.0)).all()
    xb, ldb = rational_quadratic_spline(y, w, h, d, low=-2.0, high=3.0, inverse=True)
    assert ((xb - x).abs() <= roundtrip_tol(ld, scale=3.0)).all()
    yi, _ = rational_quadratic_spline(x, w, h, d, low=-2.0, high=3.0, inverse=True)
    xf, _ = rational_quadratic_spline(yi, w, h, d, low=-2.0, high=3.0)
    assert torch.allclose(xf, x, atol=1e-10, rtol=0)


@PROPS
@given(seed=seeds, k=st.integers(1, 10), xs=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=16))
def test_property_unbounded_round_trip(seed, k, xs):
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(xs, dtype=F64)
    w, h, d = spline_params(g, x.shape[0], k, "unbounded", scale=2.0)
    y, ld = unbounded_rational_quadratic_spline(x, w, h, d, bound=2.5)
    xb, _ = unbounded_rational_quadratic_spline(y, w, h, d, bound=2.5, inverse=True)
    assert ((xb - x).abs() <= roundtrip_tol(ld, scale=3.0)).all()
    yi, _ = unbounded_rational_quadratic_spline(x, w, h, d, bound=2.5, inverse=True)
    xf, _ = unbounded_rational_quadratic_spline(yi, w, h, d, bound=2.5)
    assert torch.allclose(xf, x, atol=1e-10, rtol=0)


@PROPS
@given(
    seed=seeds,
    k=st.integers(1, 10),
    xs=st.lists(st.floats(-100.0, 100.0), min_size=1, max_size=16),
    shift=st.one_of(st.none(), st.floats(-10.0, 10.0)),
)
def test_property_circular_round_trip(seed, k, xs, shift):
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor(xs, dtype=F64)
    w, h, d = spline_params(g, theta.shape[0], k, "circular", scale=2.0)
    y, ld = circular_rational_quadratic_spline(theta, w, h, d, shift=shift)
    assert ((y >= 0) & (y < TWO_PI)).all()
    xb, _ = circular_rational_quadratic_spline(y, w, h, d, shift=shift, inverse=True)
    assert (circ_dist(xb, theta) <= roundtrip_tol(ld, scale=TWO_PI)).all()
    yi, _ = circular_rational_quadratic_spline(theta, w, h, d, shift=shift, inverse=True)
    xf, _ = circular_rational_quadratic_spline(yi, w, h, d, shift=shift)
    assert (circ_dist(xf, theta) <= 1e-10).all()


@PROPS
@given(
    seed=seeds,
    m=st.integers(1, 6),
    xs=st.lists(st.floats(-20.0, 20.0), min_size=1, max_size=16),
    shift=st.one_of(st.none(), st.floats(-10.0, 10.0)),
)
def test_property_ncp_mixture_round_trip(seed, m, xs, shift):
    g = torch.Generator().manual_seed(seed)
    theta = torch.tensor(xs, dtype=F64)
    s, wts = mixture_params(g, theta.shape[0], m, scale=2.0)
    y, ld = ncp_mixture(theta, s, wts, shift=shift)
    xb, ldb = ncp_mixture(y, s, wts, shift=shift, inverse=True)
    assert (circ_dist(xb, theta) <= roundtrip_tol(ld, scale=TWO_PI)).all()
    yi, ldi = ncp_mixture(theta, s, wts, shift=shift, inverse=True)
    xf, ldf = ncp_mixture(yi, s, wts, shift=shift)
    assert (circ_dist(xf, theta) <= 1e-12 * max(1.0, float(ldf.exp().max()))).all()
    assert torch.allclose(ldi, -ldf, atol=1e-12, rtol=0)
