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


def test_chunks_hold_many_configurations():
    from gaugeflow.io.ensemble import CHUNK_BYTES, chunk_length

    # 8x8 U(1) links, complex128: 2 kB per configuration
    n = chunk_length((2, 8, 8, 1, 1), torch.complex128)
    assert n > 100 and 1 << 20 <= n * 2048 <= 4 << 20 and n * 2048 <= CHUNK_BYTES
    assert chunk_length((2, 8, 8, 1, 1), torch.complex128, expected=7) == 7  # no chunk beyond the ensemble
    assert chunk_length((2, 8, 8, 1, 1), torch.complex128, expected=0) == 1
    # one 16^4 SU(3) configuration (37.7 MB) is more than a chunk's target: one per chunk
    assert chunk_length((4, 16, 16, 16, 16, 3, 3), torch.complex128) == 1


@pytest.mark.parametrize("spec,filt,level", [(None, None, None), ("gzip", "gzip", 4), ("gzip:9", "gzip", 9),
                                             ("lzf", "lzf", None)])
def test_compressed_chunked_appends_read_with_plain_h5py(tmp_path, spec, filt, level):
    path = tmp_path / "ens.h5"
    g = torch.Generator().manual_seed(0)
    phi = torch.randn((23, 4, 6), dtype=torch.float64, generator=g).round(decimals=2)  # compressible
    with EnsembleWriter(path, "phi", (4, 6), torch.float64, {"theory": "x", "shape": [4, 6]}, chunk=4,
                        compression=spec) as w:
        i = 0
        for b in (1, 3, 2, 5, 4, 1, 7):  # batches that straddle chunk boundaries
            w.append(phi[i:i + b], action=phi[i:i + b].sum((1, 2)), accepted=torch.arange(i, i + b) % 2 == 0)
            i += b
            assert w.n == i
            if i == 11:
                w.flush()  # writes the buffered part: the temporary file holds all 11
                with h5py.File(w.tmp, "r") as f:
                    assert f["phi"].shape == (11, 4, 6) and np.array_equal(f["phi"][()], phi[:11].numpy())
    with h5py.File(path, "r") as f:  # plain h5py, nothing of gaugeflow
        ds = f["phi"]
        assert ds.shape == (23, 4, 6) and ds.chunks == (4, 4, 6) and ds.maxshape == (None, 4, 6)
        assert ds.compression == filt and ds.compression_opts == level
        assert np.array_equal(ds[()], phi.numpy())
        assert np.array_equal(f["action"][()], phi.sum((1, 2)).numpy()) and f["action"].compression == filt
        assert f["accepted"][()].tolist() == [k % 2 == 0 for k in range(23)]
        assert f.attrs["n_cfg"] == 23
    assert read_ensemble(path).n_cfg == 23


def test_default_chunks_and_compression_shrink_the_file(tmp_path):
    links = torch.ones((200, 2, 8, 8, 1, 1), dtype=torch.complex128)  # cold: highly compressible
    sizes = {}
    for spec in (None, "gzip"):
        path = tmp_path / f"{spec}.h5"
        with EnsembleWriter(path, "links", links.shape[1:], links.dtype, {"theory": "u1_2d", "shape": [8, 8]},
                            compression=spec, expected=200) as w:
            for i in range(200):
                w.append(links[i:i + 1], action=torch.zeros(1))
        with h5py.File(path) as f:
            assert f["links"].chunks[0] == 200  # many configurations per chunk
        sizes[spec] = path.stat().st_size
    assert sizes["gzip"] < sizes[None] / 20


def test_bad_compression_and_columns(tmp_path):
    from gaugeflow.io.ensemble import parse_compression

    assert parse_compression("GZIP:1") == ("gzip", 1) and parse_compression("none") == (None, None)
    for bad in ("zstd", "gzip:10", "lzf:3", "gzip:"):
        with pytest.raises(ValueError, match="sample.compression must be null, gzip, gzip:<level 0-9> or lzf"):
            parse_compression(bad, "sample.compression")
    with pytest.raises(ValueError, match="compression"):
        EnsembleWriter(tmp_path / "a.h5", "phi", (4,), torch.float64, {"theory": "x", "shape": [4]}, compression="bz2")
    with pytest.raises(ValueError, match="column 'log_q' appeared after 1 configurations"):
        with EnsembleWriter(tmp_path / "b.h5", "phi", (4,), torch.float64, {"theory": "x", "shape": [4]}) as w:
            w.append(torch.zeros(1, 4), action=torch.zeros(1))
            w.append(torch.zeros(1, 4), action=torch.zeros(1), log_q=torch.zeros(1))
    assert not (tmp_path / "b.h5").exists()


def test_chain_state_round_trip(tmp_path):
    from gaugeflow.io.ensemble import read_chain_state

    path = tmp_path / "ens.h5"
    g = torch.Generator().manual_seed(5)
    last = torch.randn((1, 4), dtype=torch.float64, generator=g)
    with EnsembleWriter(path, "phi", (4,), torch.float64, {"theory": "x", "shape": [4]}) as w:
        w.append(torch.zeros(2, 4), action=torch.zeros(2))
        w.set_chain_state(torch.zeros(1, 4), g.get_state())
        w.set_chain_state(last, g.get_state(), rng_device="cpu", n_traj_chain=7)  # replaces the first
    state = read_chain_state(path)
    assert np.array_equal(state.fields, last.numpy()) and state.attrs == {"rng_device": "cpu", "n_traj_chain": 7}
    g2 = torch.Generator().set_state(torch.from_numpy(state.rng_state))
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    ens = read_ensemble(path)  # the group is not a per-configuration dataset
    assert ens.n_cfg == 2 and set(ens.columns) == {"action"}
    write(tmp_path / "plain.h5")
    assert read_chain_state(tmp_path / "plain.h5") is None


def test_killed_writer_leaves_no_file_under_the_final_name(tmp_path):
    import subprocess
    import sys

    script = (
        "import os, signal, torch\n"
        "from gaugeflow.io import EnsembleWriter\n"
        "w = EnsembleWriter('ens.h5', 'phi', (4,), torch.float64, {'theory': 'x', 'shape': [4]}, chunk=2,"
        " compression='gzip')\n"
        "for i in range(5):\n"
        "    w.append(torch.zeros(1, 4), action=torch.zeros(1))\n"
        "w.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not (tmp_path / "ens.h5").exists()
    assert [p.name.startswith(".ens.h5.tmp-") for p in tmp_path.iterdir()] == [True]
