"""Elementwise invertible maps used inside coupling layers.

* :func:`rational_quadratic_spline` -- monotone rational-quadratic (RQ) spline of
  Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", arXiv:1906.04032,
  mapping ``[low, high]`` onto itself.
* :func:`unbounded_rational_quadratic_spline` -- the same spline on
  ``[-bound, bound]`` with identity ("linear") tails outside (Durkan et al. 1906.04032, Sec. 3.1).
* :func:`circular_rational_quadratic_spline` -- circular RQ spline, a diffeomorphism of
  the circle [0, 2 pi) (Rezende, Papamakarios, Racaniere, Albergo, Kanwar, Shanahan &
  Cranmer, "Normalizing Flows on Tori and Spheres", arXiv:2002.02428).
* :func:`ncp` and :func:`ncp_mixture` -- non-compact projection x -> 2 atan(s tan(x/2))
  and convex mixtures of it (Rezende et al. 2002.02428; used for U(1) gauge theory by
  Kanwar, Albergo, Boyda, Cranmer, Hackett, Racaniere, Rezende & Shanahan, arXiv:2003.06413).

All functions are pure torch, batched over arbitrary (broadcasting) leading shapes,
differentiable in the inputs and the parameters, and return ``(y, logabsdet)`` with
``logabsdet = log |dy/dx|`` elementwise (same shape as the broadcast input). ``inverse=True``
computes the exact inverse map, and its ``logabsdet`` is minus the forward one at the
corresponding point.

Parameter conventions (the networks emit *unconstrained* numbers):

* bin widths / heights, shape ``(..., K)``: ``softmax`` then a minimum bin size,
  ``p = min_bin + (1 - K min_bin) softmax(raw)``;
* knot derivatives: ``min_derivative + softplus(raw + c)`` with
  ``c = log(expm1(1 - min_derivative))`` so that ``raw = 0`` gives derivative 1.

Identity initialisation: with **all raw parameters zero** every spline is the identity
(uniform bins, unit derivatives; exact up to rounding, ~1e-16 in float64). For the NCP
``s = 1`` is the identity for any mixture weights (and ``shift = 0``).

Angles: inputs may be any real number and are reduced to [0, 2 pi) first; outputs lie in
[0, 2 pi) *strictly* (``2 pi`` here is the dtype's rounding of 2 pi, which is also the
period ``torch.remainder`` uses).

>>> import torch
>>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
>>> z = torch.zeros(5, 8, dtype=torch.float64)
>>> y, ld = rational_quadratic_spline(x, z, z, torch.zeros(5, 9, dtype=torch.float64))
>>> bool(torch.allclose(y, x, atol=1e-12)), bool(ld.abs().max() < 1e-12)
(True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "rational_quadratic_spline",
    "unbounded_rational_quadratic_spline",
    "circular_rational_quadratic_spline",
    "ncp",
    "ncp_mixture",
    "derivative_offset",
    "wrap_angle",
]

TWO_PI = 2.0 * math.pi


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def derivative_offset(min_derivative: float) -> float:
    """The constant ``c`` with ``min_derivative + softplus(c) = 1`` (zero raw input -> slope 1)."""
    if not 0.0 <= min_derivative < 1.0:
        raise ValueError(f"min_derivative must lie in [0, 1), got {min_derivative}")
    return math.log(math.expm1(1.0 - min_derivative))


def _constrain_derivatives(raw: torch.Tensor, min_derivative: float) -> torch.Tensor:
    return min_derivative + F.softplus(raw + derivative_offset(min_derivative))


def _knots(raw: torch.Tensor, low: float, high: float, min_size: float) -> torch.Tensor:
    """Knot positions ``(..., K+1)`` from unnormalised bin sizes ``(..., K)``; ends exactly low, high."""
    k = raw.shape[-1]
    if k < 1:
        raise ValueError("need at least one bin")
    if not 0.0 < min_size or min_size * k > 1.0:
        raise ValueError(f"minimum bin size {min_size} must be positive and at most 1/K = {1.0 / k}")
    p = min_size + (1.0 - min_size * k) * torch.softmax(raw, dim=-1)
    inner = low + (high - low) * torch.cumsum(p[..., :-1], dim=-1)
    # the ends are set exactly (not by the cumulative sum) so that low/high map to low/high
    # exactly and, for the circle, the last knot is the same 2 pi the wrap uses
    ends = inner.new_full((*inner.shape[:-1], 1), low), inner.new_full((*inner.shape[:-1], 1), high)
    return torch.cat([ends[0], inner, ends[1]], dim=-1)


def wrap_angle(t: torch.Tensor) -> torch.Tensor:
    """Reduce to [0, 2 pi) strictly.

    ``torch.remainder(t, 2 pi)`` returns exactly ``2 pi`` when ``t`` is a tiny negative
    number (``t + 2 pi`` rounds up), float32 in particular; fold that back to 0. Gradient 1.
    """
    r = torch.remainder(t, TWO_PI)
    r = torch.where(r < 0, r + TWO_PI, r)  # defensive: backends that round the other way
    return torch.where(r >= TWO_PI, r - TWO_PI, r)


def _check_dtypes(x: torch.Tensor, *params: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {x.dtype}")
    for p in params:
        if p.dtype != x.dtype:
            raise TypeError(f"parameters ({p.dtype}) must have the dtype of the input ({x.dtype})")


def _batch_shape(x: torch.Tensor, *params: torch.Tensor, shift=None) -> torch.Size:
    """Broadcast shape of the input, the parameters' leading axes and an optional shift."""
    extra = () if shift is None or not isinstance(shift, torch.Tensor) else (shift.shape,)
    return torch.broadcast_shapes(x.shape, *(p.shape[:-1] for p in params), *extra)


def _rq_inverse_fraction(dy, h, s, d_near, d_far):
    """Fraction ``xi`` in [0, 1] of the bin, measured from the knot whose derivative is ``d_near``.

    Solves ``h xi (s xi + d_near (1 - xi)) / (s + (d_near + d_far - 2 s) xi (1 - xi)) = dy``,
    i.e. ``a xi^2 + b xi + c = 0`` (Durkan et al. 1906.04032, App. A), with the root formula
    ``xi = 2 c / (-b - sqrt(b^2 - 4 a c))`` that has no cancellation (b > 0 whenever c = 0).
    """
    delta = d_near + d_far - 2.0 * s
    a = h * (s - d_near) + dy * delta
    b = h * d_near - dy * delta
    c = -s * dy
    # the discriminant is > 0 in exact arithmetic (simple root) but can round negative;
    # clamp to the smallest normal number rather than 0 so sqrt's gradient stays finite
    disc = torch.clamp(b * b - 4.0 * a * c, min=torch.finfo(dy.dtype).tiny)
    return (2.0 * c) / (-b - torch.sqrt(disc))


def _rq_log_derivative(xi, eta, s, d0, d1):
    """log dy/dx inside a bin at fraction xi (eta = 1 - xi), Durkan et al. eq. (5)."""
    den = s + (d0 + d1 - 2.0 * s) * xi * eta
    num = s * s * (d1 * xi * xi + 2.0 * s * xi * eta + d0 * eta * eta)
    return torch.log(num) - 2.0 * torch.log(den)


def _rq_core(x, kx, ky, d, inverse):
    """RQ spline through knots ``(kx, ky)`` with slopes ``d`` (all ``(..., K+1)``, constrained).

    ``x`` has the leading shape of the knots. Inputs are assumed to lie in the knot range;
    outside it the end bins' rational functions are extrapolated (not a bijection).
    """
    search = (ky if inverse else kx)[..., 1:-1]
    # bin index = number of interior knots <= x; knots themselves belong to the bin on their right
    idx = torch.searchsorted(search.detach().contiguous(), x.detach().unsqueeze(-1).contiguous(), right=True)

    def at(t, offset=0):
        return t.gather(-1, idx + offset).squeeze(-1)

    x0, x1, y0, y1, d0, d1 = at(kx), at(kx, 1), at(ky), at(ky, 1), at(d), at(d, 1)
    w, h = x1 - x0, y1 - y0
    s = h / w

    if not inverse:
        xi, eta = (x - x0) / w, (x1 - x) / w
        den = s + (d0 + d1 - 2.0 * s) * xi * eta
        # y - y0 = h xi (s xi + d0 eta) / den and y1 - y = h eta (s eta + d1 xi) / den:
        # measuring from the nearer knot keeps full relative precision and maps knots
        # (in particular low and high) exactly onto knots
        from_left = y0 + h * (xi * (s * xi + d0 * eta) / den)
        from_right = y1 - h * (eta * (s * eta + d1 * xi) / den)
        y = torch.where(xi <= eta, from_left, from_right)
        return y, _rq_log_derivative(xi, eta, s, d0, d1)

    dy_left, dy_right = x - y0, y1 - x
    xi_left = _rq_inverse_fraction(dy_left, h, s, d0, d1)
    eta_right = _rq_inverse_fraction(dy_right, h, s, d1, d0)  # mirrored bin: roles of d0, d1 swap
    # use the solution measured from the knot it is nearer to *in x*: a root close to the far
    # knot comes out of its quadratic with a large relative error in (1 - fraction)
    left = xi_left <= 0.5
    out = torch.where(left, x0 + w * xi_left, x1 - w * eta_right)
    xi = torch.where(left, xi_left, 1.0 - eta_right)
    eta = torch.where(left, 1.0 - xi_left, eta_right)
    return out, -_rq_log_derivative(xi, eta, s, d0, d1)


def _expand(batch, *ts):
    return [t.expand(*batch, t.shape[-1]) for t in ts]


# ---------------------------------------------------------------------------------------
# public transforms
# ---------------------------------------------------------------------------------------
def rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    low: float = 0.0,
    high: float = 1.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monotone rational-quadratic spline of [low, high] onto itself (Durkan et al., arXiv:1906.04032).

    Args:
        x: inputs in ``[low, high]`` (ends included), any shape ``S``.
        widths, heights: unnormalised bin widths / heights ``(..., K)``; softmax, then
            ``min_bin_width`` / ``min_bin_height`` (as fractions of ``high - low``).
        derivatives: unnormalised derivatives at the ``K + 1`` knots, ``(..., K+1)``;
            slope = ``min_derivative + softplus(raw + derivative_offset(min_derivative))``.
        inverse: evaluate the inverse map (solves the per-bin quadratic).

    The leading shapes of the parameters broadcast with ``S``. Returns ``(y, logabsdet)``
    of the broadcast shape. All-zero parameters give the identity.
    """
    _check_dtypes(x, widths, heights, derivatives)
    k = widths.shape[-1]
    if heights.shape[-1] != k or derivatives.shape[-1] != k + 1:
        raise ValueError(
            f"expected widths, heights (..., K) and derivatives (..., K+1); got "
            f"{tuple(widths.shape)}, {tuple(heights.shape)}, {tuple(derivatives.shape)}"
        )
    batch = _batch_shape(x, widths, heights, derivatives)
    kx = _knots(widths, low, high, min_bin_width)
    ky = _knots(heights, low, high, min_bin_height)
    d = _constrain_derivatives(derivatives, min_derivative)
    kx, ky, d = _expand(batch, kx, ky, d)
    return _rq_core(x.expand(batch), kx, ky, d, inverse)


def unbounded_rational_quadratic_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RQ spline on ``[-bound, bound]`` with identity tails outside (Durkan et al., arXiv:1906.04032).

    Args:
        x: any real inputs, shape ``S``.
        widths, heights: unnormalised ``(..., K)``.
        derivatives: unnormalised slopes at the ``K - 1`` *interior* knots, ``(..., K-1)``;
            the slopes at ``+-bound`` are fixed to 1, so the map is C^1 across the tails.

    Outside ``[-bound, bound]``: ``y = x``, ``logabsdet = 0``. The spline branch is evaluated on
    clamped inputs, so masked-out elements cannot feed NaN/inf into values or gradients.
    All-zero parameters give the identity.
    """
    _check_dtypes(x, widths, heights, derivatives)
    k = widths.shape[-1]
    if heights.shape[-1] != k or derivatives.shape[-1] != k - 1:
        raise ValueError(
            f"expected widths, heights (..., K) and derivatives (..., K-1); got "
            f"{tuple(widths.shape)}, {tuple(heights.shape)}, {tuple(derivatives.shape)}"
        )
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    bound = float(bound)
    batch = _batch_shape(x, widths, heights, derivatives)
    kx = _knots(widths, -bound, bound, min_bin_width)
    ky = _knots(heights, -bound, bound, min_bin_height)
    inner = _constrain_derivatives(derivatives, min_derivative)
    one = inner.new_ones((*inner.shape[:-1], 1))
    d = torch.cat([one, inner, one], dim=-1)
    kx, ky, d = _expand(batch, kx, ky, d)

    x = x.expand(batch)
    inside = (x >= -bound) & (x <= bound)
    y_in, ld_in = _rq_core(x.clamp(-bound, bound), kx, ky, d, inverse)
    y = torch.where(inside, y_in, x)
    logabsdet = torch.where(inside, ld_in, torch.zeros_like(ld_in))
    return y, logabsdet


def circular_rational_quadratic_spline(
    theta: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    shift: torch.Tensor | float | None = None,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Circular RQ spline, a diffeomorphism of [0, 2 pi) (Rezende et al., arXiv:2002.02428).

    Knots at 0 and 2 pi are fixed points of the spline; ``derivatives`` ``(..., K)`` are the
    unnormalised slopes at knots ``0 .. K-1`` and the slope at 2 pi is the one at 0, so the
    map and its derivative are continuous across 0 = 2 pi.

    Args:
        theta: any real angles (reduced mod 2 pi first), shape ``S``.
        widths, heights: unnormalised ``(..., K)``.
        derivatives: unnormalised ``(..., K)``.
        shift: optional rotation applied after the spline (``y = spline(theta) + shift mod 2 pi``;
            the inverse subtracts it first). Does not change ``logabsdet``.

    Output in [0, 2 pi) strictly. All-zero parameters (and no shift) give the identity.
    """
    _check_dtypes(theta, widths, heights, derivatives)
    k = widths.shape[-1]
    if heights.shape[-1] != k or derivatives.shape[-1] != k:
        raise ValueError(
            f"expected widths, heights and derivatives all (..., K); got "
            f"{tuple(widths.shape)}, {tuple(heights.shape)}, {tuple(derivatives.shape)}"
        )
    batch = _batch_shape(theta, widths, heights, derivatives, shift=shift)
    kx = _knots(widths, 0.0, TWO_PI, min_bin_width)
    ky = _knots(heights, 0.0, TWO_PI, min_bin_height)
    d = _constrain_derivatives(derivatives, min_derivative)
    d = torch.cat([d, d[..., :1]], dim=-1)  # periodic: slope at 2 pi = slope at 0
    kx, ky, d = _expand(batch, kx, ky, d)

    t = theta.expand(batch)
    if inverse and shift is not None:
        t = t - shift
    y, logabsdet = _rq_core(wrap_angle(t), kx, ky, d, inverse)
    if not inverse and shift is not None:
        y = y + shift
    # an input just below 2 pi can round onto 2 pi (~ 0 on the circle): fold it back
    return wrap_angle(y), logabsdet


def _ncp_log_derivative(t, s):
    # d/dt 2 atan(s tan(t/2)) = s / (cos^2(t/2) + s^2 sin^2(t/2)), bounded in [min(s,1/s), max(s,1/s)]
    half = 0.5 * t
    return torch.log(s) - torch.log(torch.cos(half) ** 2 + (s * torch.sin(half)) ** 2)


def ncp(
    theta: torch.Tensor, s: torch.Tensor | float, *, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-compact projection ``x -> 2 atan(s tan(x / 2))`` of the circle (Rezende et al., arXiv:2002.02428).

    On (-pi, pi] this is the textbook formula; as a map of [0, 2 pi) it is evaluated as
    ``2 atan2(s sin(theta/2), cos(theta/2))``, the same map mod 2 pi (fixed points 0 and pi)
    but without the ``tan`` pole at theta = pi. ``s > 0`` broadcasts with ``theta`` (callers
    produce it with softplus); ``s = 1`` is the identity, ``1/s`` the inverse. Used for U(1)
    gauge theory by Kanwar et al., arXiv:2003.06413.

    Returns ``(y, log|dy/dtheta|)`` with ``y`` in [0, 2 pi).
    """
    t = wrap_angle(theta)
    s = torch.as_tensor(s, dtype=t.dtype, device=t.device)
    half = 0.5 * t
    if not inverse:
        y = 2.0 * torch.atan2(s * torch.sin(half), torch.cos(half))
        y = wrap_angle(y)  # atan2 can round to pi, i.e. y onto 2 pi
        return y, _ncp_log_derivative(t, s)
    x = wrap_angle(2.0 * torch.atan2(torch.sin(half), s * torch.cos(half)))
    return x, -_ncp_log_derivative(x, s)


def _mixture(t, s, w):
    """Lift of the NCP mixture on [0, 2 pi) (values in [0, 2 pi]) and its derivative."""
    half = 0.5 * t.unsqueeze(-1)
    sn, cs = torch.sin(half), torch.cos(half)
    g = 2.0 * torch.atan2(s * sn, cs)
    dg = s / (cs * cs + (s * sn) ** 2)
    return (w * g).sum(-1), (w * dg).sum(-1)


@torch.no_grad()
def _solve_mixture(z, s, w, max_iter=100):
    """Vectorised safeguarded Newton ("rtsafe") for ``mixture(t) = z``, t in [0, 2 pi).

    The lift is strictly increasing from 0 to 2 pi, so ``[0, 2 pi]`` brackets every root. A
    Newton step is taken when it stays inside the current bracket and shrinks at least by half
    compared to the step before last; otherwise bisect. Converges quadratically near the root
    and never slower than bisection, to full (relative) float precision in t.
    """
    two_pi = torch.tensor(TWO_PI, dtype=z.dtype, device=z.device)
    # largest float below 2 pi: the lift evaluated at 2 pi itself can wrap (sin(pi) < 0 in float32)
    top = torch.nextafter(two_pi, torch.zeros_like(two_pi))
    eps, tiny = torch.finfo(z.dtype).eps, torch.finfo(z.dtype).tiny
    lo = torch.zeros_like(z)
    hi = torch.full_like(z, TWO_PI)
    x = z.clone()  # the identity is the natural first guess
    # last step and the one before (Numerical Recipes' rtsafe compares against the latter)
    dx = torch.full_like(z, TWO_PI)
    dx_old = dx.clone()
    done = torch.zeros_like(z, dtype=torch.bool)
    for _ in range(max_iter):
        f, df = _mixture(x, s, w)
        f = f - z
        lo = torch.where(f < 0, x, lo)
        hi = torch.where(f > 0, x, hi)
        step = f / df
        newton = x - step
        # tolerance relative to x: near 0 floats are dense and a steep map (large s) needs them
        xtol = 4.0 * eps * x.abs() + tiny
        # a Newton step below tolerance means x is at the root to rounding: accept it (it may
        # land on the bracket edge by rounding, which must not trigger a bisection away from it)
        small = step.abs() <= xtol
        bisect = ~small & ((newton <= lo) | (newton >= hi) | ((2.0 * f).abs() > (dx_old * df).abs()))
        x_new = torch.where(bisect, 0.5 * (lo + hi), newton).clamp(min=0.0).minimum(top)
        x_new = torch.where(done, x, x_new)  # converged elements stay put
        done = done | small | (hi - lo <= 2.0 * xtol)
        dx_old, dx = dx, x_new - x
        x = x_new
        if bool(done.all()):
            break
    return x


def ncp_mixture(
    theta: torch.Tensor,
    s: torch.Tensor,
    weights: torch.Tensor,
    *,
    inverse: bool = False,
    shift: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex mixture of NCPs, ``y = sum_m w_m NCP_{s_m}(theta) + shift  (mod 2 pi)``.

    Rezende et al., arXiv:2002.02428; the U(1) flows of Kanwar et al., arXiv:2003.06413.

    Args:
        theta: any real angles, shape ``S``.
        s: positive NCP scales ``(..., M)``.
        weights: non-negative mixture weights ``(..., M)``, normalised here by their sum over
            ``M`` (a softmax output passes unchanged).
        shift: optional rotation (broadcasts with ``S``).

    Each NCP lift maps [0, 2 pi) increasingly onto itself, so the mixture does too and is a
    circle diffeomorphism with ``dy/dtheta = sum_m w_m NCP'_{s_m}``. The inverse has no closed
    form: it is found by vectorised safeguarded Newton/bisection to float precision, then one
    zero-valued differentiable Newton correction at the root attaches the implicit-function gradients
    (d theta / d(y, s, w, shift)); its ``logabsdet`` is minus the forward one at the solution.
    ``s = 1`` (any weights, no shift) is the identity.
    """
    _check_dtypes(theta, s, weights)
    if s.shape[-1] != weights.shape[-1]:
        raise ValueError(f"s {tuple(s.shape)} and weights {tuple(weights.shape)} differ in M")
    w = weights / weights.sum(-1, keepdim=True)
    batch = _batch_shape(theta, s, w, shift=shift)
    t = theta.expand(batch)
    if not inverse:
        y, dy = _mixture(wrap_angle(t), s, w)
        if shift is not None:
            y = y + shift
        return wrap_angle(y), torch.log(dy)

    if shift is not None:
        t = t - shift
    z = wrap_angle(t)
    root = _solve_mixture(z.detach(), s.detach().expand(*batch, s.shape[-1]),
                          w.detach().expand(*batch, w.shape[-1]))
    # attach the implicit-function gradient d theta = -dF / F' (F = mixture(theta) - z) without
    # moving the value: a full Newton step from a root pinned at the end of float resolution
    # (steep maps in float32) could jump far, while the solver's own last step already polished it
    f, df = _mixture(root, s, w)
    residual = f - z
    x = root - (residual - residual.detach()) / df
    _, dx = _mixture(x, s, w)
    return x, -torch.log(dx)
