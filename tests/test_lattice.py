import pytest
import torch

from gaugeflow.lattice import Lattice, checkerboard, coordinates, shift, use_shift, validate_shape


def test_shift_is_forward_neighbour():
    x = torch.arange(2 * 3 * 4).reshape(2, 3, 4)  # batch 2, lattice 3 x 4
    y = shift(x, 0, 1)
    assert y[0, 0, 0] == x[0, 1, 0] and y[0, 2, 1] == x[0, 0, 1]  # periodic wrap
    z = shift(x, 1, -1)
    assert z[1, 1, 0] == x[1, 1, 3]
    assert torch.equal(shift(shift(x, 1, 3), 1, -3), x)
    assert torch.equal(shift(x, 1, 4), x)


def test_shift_carries_internal_axes():
    x = torch.randn(1, 4, 5, 3, 3)
    y = shift(x, 1, 2)
    assert torch.equal(y[0, 1, 0], x[0, 1, 2])


def test_use_shift_routes_every_shift():
    calls = []

    def spy(field, mu, n):
        calls.append((mu, n))
        return torch.roll(field, -n, 1 + mu)

    x = torch.randn(1, 4, 4)
    with use_shift(spy):
        y = shift(x, 1, 1)
    assert calls == [(1, 1)] and torch.equal(y, shift(x, 1, 1))
    shift(x, 0, 1)
    assert len(calls) == 1  # the context is left


def test_lattice_properties():
    lat = Lattice((4, 6, 2))
    assert lat.ndim == 3 and lat.volume == 48 and lat.planes == [(0, 1), (0, 2), (1, 2)]
    assert lat.n_plaquettes == 48 * 3
    assert lat.link_shape(5, 3) == (5, 3, 4, 6, 2, 3, 3)


@pytest.mark.parametrize("bad", [[0, 4], [4, -1], [], [2.5, 4], "abc", None])
def test_validate_shape_rejects(bad):
    with pytest.raises(ValueError, match="lattice.shape"):
        validate_shape(bad)


def test_coordinates_and_checkerboard():
    c = coordinates((2, 3))
    assert c.shape == (2, 2, 3) and c[0, 1, 2] == 1 and c[1, 1, 2] == 2
    cb = checkerboard((4, 4))
    assert cb.sum() == 8 and (cb + shift(cb[None], 0, 1)[0]).eq(1).all()


@pytest.mark.parametrize("width", [0, 1, 2, 5])
def test_pad_is_periodic_halo(width):
    from gaugeflow.lattice import pad

    x = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    y = pad(x, 1, width)
    assert y.shape == (2, 3, 4 + 2 * width)
    for i in range(4 + 2 * width):
        assert torch.equal(y[:, :, i], x[:, :, (i - width) % 4])
    z = pad(x, 0, width, lead=2)  # channels-first: lattice axis 0 is tensor axis 2
    assert torch.equal(z, pad(x, 1, width))


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_pad_gradient(width):
    from gaugeflow.lattice import pad

    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad(t, 1, width), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pad(t, 0, min(width, 3)), (x,))
