"""Periodic convolutions on lattices of any dimension: the context networks of coupling layers.

A coupling layer (Albergo et al. 1904.12072, Kanwar et al. 2003.06413, Abbott et al. 2305.02402
in 4d) reads the frozen part of the field through a translation-equivariant network; here that
is a stack of :class:`PeriodicConv` layers (:class:`ConvNet`) acting on channels-first fields
``(batch, C, L_0, ..., L_{d-1})``.

Periodicity never comes from ``torch.roll`` or circular padding: every layer first adds a halo
of ``kernel_size // 2`` sites along each lattice axis with :func:`gaugeflow.lattice.pad` (lead 2)
and then runs a *valid* (unpadded) convolution. A domain-decomposed lattice swaps ``pad`` for a
halo exchange with :func:`gaugeflow.lattice.use_shift` and the networks follow unchanged.
Extents smaller than the kernel (``L = 2`` with kernel 3) work because ``pad`` wraps as often
as needed.

Torch has ``conv1d/2d/3d`` only. For ``d <= 3`` the padded field goes to ``F.conv{d}d``
directly; for ``d >= 4`` the ``m = d - 3`` leading lattice axes are handled by one of these
(all exact, all differentiable, selectable with ``method=``):

``fold``     im2col along the m leading axes only: their ``k^m`` kernel offsets are moved into
             the input channels, ``(B * L_0..L_{m-1}, C * k^m, P_m, P_m+1, P_m+2)``, and a single
             ``conv3d`` with the weight viewed as ``(out, C * k^m, k, k, k)`` does the rest.
``slices``   ``k^m`` ``conv3d`` calls, one per offset along the leading axes, on shifted slices
             of the padded field with the lead axes moved into the batch; the results are summed.
``outfold``  one ``conv3d`` on every padded slice with the ``k^m`` offsets stacked in the
             *output* channels, then the shifted diagonal ``y[x + a, a]`` is summed over ``a``.
``im2col``   full unfold along all d axes and one matmul with the ``(out, C * k^d)`` weight.

Measured with ``tools/bench_conv.py`` on the shared 2-core development machine (torch 2.13 CPU,
one thread, CPU time of that thread so that other processes' load does not inflate it; forward
+ backward w.r.t. input, weight and bias, halo included; median of 7 rounds, ms; "default" is
what :func:`default_method` picks)::

    workload (batch x C_in -> C_out, lattice, k=3)  dtype     fold  slices  outfold  im2col  default
    8 x 2 -> 32 on 8^4 (first layer)                float32   26.2    50.6     80.1    78.1  fold
    8 x 8 -> 32 on 8^4                              float32   65.2    78.8    111.6   337.4  fold
    8 x 16 -> 32 on 8^4                             float32   99.5   112.5    168.1   739.6  fold
    8 x 32 -> 32 on 8^4 (hidden layer)              float32  249.0   220.1    281.4  1821.7  slices
    16 x 32 -> 32 on 4^4                            float32   33.6    32.7     44.6   181.5  slices
    4 x 16 -> 16 on 8^4, k=5                        float32  171.5   177.0    254.0  2438.2  slices
    4 x 2 -> 16 on 6^5                              float32   47.0    68.1    243.4   293.2  fold
    4 x 16 -> 16 on 6^5                             float32  321.4   209.4    391.9  2300.9  slices
    8 x 2 -> 32 on 8^4 (first layer)                float64  140.4    91.2    190.1   195.7  slices
    8 x 8 -> 32 on 8^4                              float64  495.6   409.8    245.4   708.6  outfold
    8 x 16 -> 32 on 8^4                             float64 1083.3  1152.2    634.2  1420.8  outfold
    8 x 32 -> 32 on 8^4 (hidden layer)              float64 2312.8  2254.4   1332.3  2994.1  outfold
    16 x 32 -> 32 on 4^4                            float64  344.6   232.8    167.7   311.1  outfold
    4 x 16 -> 16 on 8^4, k=5                        float64 3232.7  3267.9   1404.7  7061.2  outfold
    4 x 2 -> 16 on 6^5                              float64  450.8   225.0    320.2   504.2  slices
    4 x 16 -> 16 on 6^5                             float64 3420.8  3280.4   1283.9  5443.2  outfold

The full unfold (``im2col``) never wins: it copies the input k^d = 81 times. fold and slices
are within 15% of each other in 4d float32 except for few input channels, where fold is 1.2-2x
faster; forward-only times rank the same way (hidden layer float32: 71 / 64 / 93 / 838 ms).
With two threads under the same machine's load (wall clock, 2-3x above these times) fold won
every float32 case, hidden layer 565 vs 792 ms and 5d 749 vs 1823 ms: one conv call has fewer
thread barriers to lose to preemption. Pass ``method="fold"`` where that is the regime; GPUs
were not measured. Reproduce with::

    python tools/bench_conv.py --threads 1 --clock cpu --workloads all --dtype float32 float64
    python tools/bench_conv.py --threads 2 --workloads 4d-hidden 5d 4d-k5 --methods fold slices
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gaugeflow.lattice import pad

__all__ = ["METHODS", "ConvNet", "PeriodicConv", "default_method", "periodic_conv"]

#: ways to convolve in d >= 4 (see the module docstring); ``None``/``"auto"`` picks per layer
METHODS = ("fold", "slices", "outfold", "im2col")
# float32: fold while the folded input width C_in * k^(d-3) is at most this (measured)
_FOLD_MAX_WIDTH = 48
# float64: slices up to this many input channels, outfold beyond (measured)
_SLICES_MAX_CHANNELS_F64 = 4

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

_ACTIVATIONS = {
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


def _halo(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Add a periodic halo of ``radius`` sites along every lattice axis of ``(B, C, *L)``."""
    if radius == 0:
        return x  # a 1-site kernel has no neighbours to fetch
    # padding axis by axis on the already padded tensor also fills the corners
    for mu in range(x.dim() - 2):
        x = pad(x, mu, radius, lead=2)
    return x


# ----------------------------------------------------------------------------------------------
# valid convolutions of an already padded field xp = (B, C, P_0, ..., P_{d-1}), P = L + k - 1;
# weight (out, in, k, ..., k). All return (B, out, L_0, ..., L_{d-1}).


def _conv_fold(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """im2col along the first ``m`` axes, then one ``conv{d-m}d`` (a matmul when ``m == d``)."""
    B, C = xp.shape[:2]
    d = xp.dim() - 2
    k = weight.shape[-1]
    c = d - m
    u = xp
    for i in range(m):
        u = u.unfold(2 + i, k, 1)  # axis i -> its L_i output sites, window appended last
    lead = tuple(u.shape[2 : 2 + m])
    rest = tuple(u.shape[2 + m : 2 + d])
    # (B, L_0..L_{m-1}, C, k_0..k_{m-1}, P_m..P_{d-1}): channel order matches weight (in, k_0, ...)
    perm = [0, *range(2, 2 + m), 1, *range(2 + d, 2 + d + m), *range(2 + m, 2 + d)]
    u = u.permute(perm).reshape(B * _prod(lead), C * k**m, *rest)
    w = weight.reshape(weight.shape[0], C * k**m, *([k] * c))
    if c == 0:
        y = F.linear(u, w, bias)  # (B * V, out)
        return y.reshape(B, *lead, -1).movedim(-1, 1).contiguous()
    y = _CONV[c](u, w, bias)
    # every method returns a contiguous result: the copy costs < 1% of the conv
    return y.reshape(B, *lead, *y.shape[1:]).movedim(1 + m, 1).contiguous()


def _conv_slices(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """Sum over the ``k^m`` offsets of the first ``m`` axes of ``conv{d-m}d`` on shifted slices."""
    B = xp.shape[0]
    d = xp.dim() - 2
    k = weight.shape[-1]
    conv = _CONV[d - m]
    # (P_0..P_{m-1}, B, C, rest): for m == 1 every slice along axis 0 is a contiguous view
    u = xp.permute(*range(2, 2 + m), 0, 1, *range(2 + m, 2 + d)).contiguous()
    lead = tuple(p - k + 1 for p in u.shape[:m])
    y = None
    for offset in itertools.product(range(k), repeat=m):
        s = u
        for i, a in enumerate(offset):
            s = s.narrow(i, a, lead[i])
        part = conv(s.reshape(-1, *u.shape[m + 1 :]), weight[(slice(None), slice(None), *offset)])
        y = part if y is None else y + part
    if bias is not None:
        y = y + bias.reshape(-1, *([1] * (d - m)))
    y = y.reshape(*lead, B, *y.shape[1:])  # (L_0..L_{m-1}, B, out, rest)
    return y.permute(m, m + 1, *range(m), *range(m + 2, 2 + d)).contiguous()


def _conv_outfold(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, m: int) -> torch.Tensor:
    """One ``conv{d-m}d`` with the lead-axis offsets in the output channels, then a diagonal sum."""
    B, C = xp.shape[:2]
    d = xp.dim() - 2
    k = weight.shape[-1]
    out = weight.shape[0]
    P = tuple(xp.shape[2 : 2 + m])
    u = xp.movedim(1, 1 + m).reshape(B * _prod(P), C, *xp.shape[2 + m :])
    w = weight.movedim(tuple(range(2, 2 + m)), tuple(range(m))).reshape(k**m * out, C, *([k] * (d - m)))
    y = _CONV[d - m](u, w)
    y = y.reshape(B, *P, *([k] * m), out, *y.shape[2:])
    for i in range(m):
        # out[x_i] = sum_a y[x_i + a, a]: a window along P_i, then its diagonal with the offset axis
        y = y.unfold(1 + i, k, 1).diagonal(0, 1 + m, -1).sum(-1)
    if bias is not None:
        y = y + bias.reshape(-1, *([1] * (d - m)))
    return y.movedim(1 + m, 1).contiguous()


_IMPLS = {"fold": _conv_fold, "slices": _conv_slices, "outfold": _conv_outfold}


def default_method(dtype: torch.dtype, in_channels: int, kernel_size: int, ndim: int) -> str:
    """The method ``periodic_conv`` uses when none is given: the fastest one measured on CPU.

    float64: ``outfold`` (torch's float64 conv has no oneDNN kernel and pays an im2col per
    sample, which one wide ``outfold`` call shares among the ``k^m`` offsets), except for a few
    input channels (a first layer), where its diagonal-sum backward costs more than it saves and
    ``slices`` wins. Other dtypes: ``fold`` while the folded width ``in_channels * k^(d-3)`` is at
    most 48 (it turns a first layer's 2 channels into a GEMM width oneDNN is efficient at),
    ``slices`` beyond (no k-fold input copy, no unfold in the backward). For ``d <= 3`` the
    answer does not matter: every method but ``im2col`` is torch's own conv.
    """
    if dtype == torch.float64:
        return "slices" if in_channels <= _SLICES_MAX_CHANNELS_F64 else "outfold"
    width = in_channels * kernel_size ** max(ndim - 3, 0)
    return "fold" if width <= _FOLD_MAX_WIDTH else "slices"


def periodic_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    method: str | None = None,
) -> torch.Tensor:
    """Periodic ("same") convolution of ``x = (batch, C_in, L_0, ..., L_{d-1})``.

    ``weight`` is ``(C_out, C_in, k, ..., k)`` with d kernel axes and odd k (cross-correlation,
    as torch's conv): ``y[b, o, x] = bias[o] + sum_{i, a} weight[o, i, a] x[b, i, x + a - k//2]``
    with periodic ``x + a - k//2``. ``method`` picks the d >= 4 algorithm (:data:`METHODS`;
    ``None`` or ``"auto"``: :func:`default_method`). For d <= 3 every method but ``im2col`` is
    torch's own ``F.conv{d}d`` on the padded field (there are no leading axes to fold).
    """
    d = x.dim() - 2
    if weight.dim() != d + 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match a {d}d input {tuple(x.shape)}")
    k = weight.shape[-1]
    if any(s != k for s in weight.shape[2:]) or k % 2 == 0:
        raise ValueError(f"kernel must be cubic with odd size, got {tuple(weight.shape[2:])}")
    if method is None or method == "auto":
        method = default_method(x.dtype, x.shape[1], k, d)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    xp = _halo(x, k // 2)
    if method == "im2col":
        return _conv_fold(xp, weight, bias, d)
    if d <= 3:
        return _CONV[d](xp, weight, bias)
    return _IMPLS[method](xp, weight, bias, d - 3)


class PeriodicConv(nn.Module):
    """Convolution with periodic boundaries on a d-dimensional lattice, any extents.

    Input ``(batch, in_channels, L_0, ..., L_{d-1})``, output ``(batch, out_channels, L_0, ...)``.
    The weight has torch's layout ``(out, in, k, ..., k)`` (d kernel axes) and the same default
    initialisation as ``nn.Conv{d}d``, so its state dict is that of a torch conv for d <= 3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ndim: int,
        bias: bool = True,
        method: str | None = None,
    ):
        super().__init__()
        if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            # an even kernel has no centre: the output would sit half a site off the input
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        if int(ndim) != ndim or ndim < 1:
            raise ValueError(f"ndim must be a positive integer, got {ndim!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels} -> {out_channels}")
        if method not in (None, "auto", *METHODS):
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.ndim = int(ndim)
        self.method = method
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *([kernel_size] * ndim)))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # exactly torch's _ConvNd.reset_parameters
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**self.ndim
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (batch, {self.in_channels}, L_0..L_{self.ndim - 1}), got {tuple(x.shape)}"
            )
        return periodic_conv(x, self.weight, self.bias, self.method)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ndim={self.ndim}"
        if self.bias is None:
            s += ", bias=False"
        if self.method not in (None, "auto"):
            s += f", method={self.method!r}"
        return s


def _activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class ConvNet(nn.Module):
    """A stack of :class:`PeriodicConv` layers ``in -> hidden[0] -> ... -> out``.

    ``activation`` follows every hidden layer, ``final_activation`` (default none) the last
    one. ``zero_init=True`` sets the last layer's weight and bias to exactly zero, so a coupling
    layer driven by this network starts at the identity. ``method`` goes to every layer
    (default: each layer picks with :func:`default_method`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int] = (32, 32),
        kernel_size: int = 3,
        ndim: int = 2,
        activation: str = "leaky_relu",
        final_activation: str | None = None,
        zero_init: bool = False,
        method: str | None = None,
    ):
        super().__init__()
        sizes = [int(in_channels), *(int(h) for h in hidden), int(out_channels)]
        _activation(activation)  # fail early on a typo even with no hidden layer
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(PeriodicConv(a, b, kernel_size, ndim, method=method))
            last = i == len(sizes) - 2
            act = _activation(final_activation if last else activation)
            if not isinstance(act, nn.Identity):
                layers.append(act)
        self.net = nn.Sequential(*layers)
        self.ndim = int(ndim)
        if zero_init:
            last_conv = self.convs[-1]
            nn.init.zeros_(last_conv.weight)
            nn.init.zeros_(last_conv.bias)

    @property
    def convs(self) -> list[PeriodicConv]:
        return [m for m in self.net if isinstance(m, PeriodicConv)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
