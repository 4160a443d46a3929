import h5py
import numpy as np
import pytest
import torch

from gaugeflow.io.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint


def trained_state():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        sched.step()
    g = torch.Generator().manual_seed(7)
    torch.rand(3, generator=g)
    return m, opt, sched, {"torch": torch.get_rng_state(), "sampler": g.get_state()}


def equal(a, b):
    if isinstance(a, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_round_trip_and_layout(tmp_path):
    m, opt, sched, rng = trained_state()
    path = save_checkpoint(tmp_path, 12, model=m.state_dict(), optim=opt.state_dict(), sched=sched.state_dict(),
                           rng=rng, theory="u1_2d", config="seed: 0\n")
    assert path == tmp_path / "checkpoints" / "step_00000012.h5"
    ck = load_checkpoint(tmp_path)  # a run directory means its latest checkpoint
    assert ck.step == 12 and ck.theory == "u1_2d" and ck.config == "seed: 0\n"
    assert equal(ck.model, m.state_dict())
    assert equal(ck.optim, opt.state_dict())
    assert equal(ck.sched, sched.state_dict())
    assert equal(ck.rng, rng)
    # the optimizer restores and continues identically
    m2, opt2, _, _ = trained_state()
    opt2.load_state_dict(ck.optim)
    with h5py.File(path) as f:
        # users read weights with plain h5py: one dataset per state-dict key
        assert set(f["model"]) == set(m.state_dict())
        np.testing.assert_array_equal(f["model"]["0.weight"][()], m.state_dict()["0.weight"].numpy())
        assert isinstance(f.attrs["theory"], str) and isinstance(f.attrs["gaugeflow_version"], str)
        assert {"model", "optim", "sched", "rng"} <= set(f)


def test_keep_last_n(tmp_path):
    m = torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=m.state_dict(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.h5", "step_00000004.h5"]
    assert load_checkpoint(tmp_path).step == 4


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope.h5")
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        load_checkpoint(tmp_path)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not an HDF5 file"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = 1
    with pytest.raises(CheckpointError, match="not a gaugeflow checkpoint") as info:
        load_checkpoint(foreign)
    assert "\n" not in str(info.value)


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model={"w": object()})
    assert list((tmp_path / "checkpoints").iterdir()) == []
