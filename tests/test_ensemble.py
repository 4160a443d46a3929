import h5py
import numpy as np
import pytest
import torch

from gaugeflow.io import EnsembleError, EnsembleWriter, read_ensemble


def write(path, n=3, shape=(4, 4), N=2, **attrs):
    links = torch.randn((n, len(shape), *shape, N, N), dtype=torch.complex128)
    with EnsembleWriter(path, "links", links.shape[1:], links.dtype, {"theory": "su2_2d", "shape": list(shape), **attrs}) as w:
        for i in range(n):
            w.append(links[i:i + 1], action=torch.tensor([float(i)]), accepted=torch.tensor([True]))
    return links


def test_round_trip(tmp_path):
    path = tmp_path / "ens.h5"
    links = write(path, beta=2.0, seed=3)
    ens = read_ensemble(path)
    assert ens.n_cfg == 3 and ens.theory == "su2_2d" and ens.field_name == "links"
    assert torch.equal(ens.tensor(), links)
    assert ens.columns["action"].tolist() == [0.0, 1.0, 2.0]
    assert ens.columns["accepted"].dtype == np.bool_
    assert ens.attrs["beta"] == 2.0 and ens.attrs["seed"] == 3
    last = read_ensemble(path, last_only=True)
    assert torch.equal(last.tensor(), links[-1:])
    with h5py.File(path) as f:
        # attribute types of the contract: UTF-8 str, integer shape array
        assert isinstance(f.attrs["theory"], str) and isinstance(f.attrs["created"], str)
        assert f.attrs["shape"].dtype.kind == "i" and list(f.attrs["shape"]) == [4, 4]
        assert {"gaugeflow_version", "git_sha", "created"} <= set(f.attrs)


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "ens.h5"
    with pytest.raises(RuntimeError):
        with EnsembleWriter(path, "phi", (4,), torch.float64, {"theory": "x", "shape": [4]}) as w:
            w.append(torch.zeros(1, 4))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_partial_file_is_not_under_final_name(tmp_path):
    path = tmp_path / "ens.h5"
    w = EnsembleWriter(path, "phi", (4,), torch.float64, {"theory": "x", "shape": [4]})
    w.append(torch.zeros(2, 4))
    w.flush()
    assert not path.exists() and len(list(tmp_path.iterdir())) == 1
    w.close()
    assert path.exists() and read_ensemble(path).n_cfg == 2


def test_reader_errors(tmp_path):
    with pytest.raises(EnsembleError, match="no such ensemble file"):
        read_ensemble(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(EnsembleError, match="not an HDF5 file"):
        read_ensemble(text)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(EnsembleError, match="not a gaugeflow ensemble"):
        read_ensemble(foreign)
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["theory"] = "u1_2d"
        f.attrs["shape"] = [4, 4]
        f["links"] = np.zeros((2, 2, 4, 5, 1, 1), dtype=np.complex128)
    with pytest.raises(EnsembleError, match="dataset 'links'"):
        read_ensemble(bad)
    real = tmp_path / "real.h5"
    with h5py.File(real, "w") as f:
        f.attrs["theory"] = "u1_2d"
        f.attrs["shape"] = [4, 4]
        f["links"] = np.zeros((2, 2, 4, 4, 1, 1))
    with pytest.raises(EnsembleError, match="dtype float64") as info:
        read_ensemble(real)
    assert "\n" not in str(info.value) and str(real) in str(info.value)
