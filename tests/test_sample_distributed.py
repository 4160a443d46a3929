"""``gaugeflow sample dist=ddp``: each rank draws, measures and writes its own share; only scalars travel;
readers see one ensemble file (an HDF5 virtual dataset over the ranks' part files)."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.distributed.elastic.utils.distributed import get_free_port

from gaugeflow.cli.sample import VirtualEnsembleWriter, _imh_seed, merge_runs, part_name
from gaugeflow.io import read_ensemble
from gaugeflow.io.checkpoint import save_checkpoint
from gaugeflow.io.ensemble import EnsembleWriter

ENV = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
SAVED = ("theory: {name: u1_2d, kind: gauge, group: u1, dim: 2, default_shape: [8, 8], beta: 1.0, action: wilson}\n"
         "lattice: {shape: [4, 4]}\nmodel: {kind: u1_equivariant, n_layers: 2, hidden: [4]}\n")


def launch(n, *args, cwd):
    """``n`` ranks of ``gaugeflow sample`` with torchrun's variables; their (rc, stdout, stderr)."""
    port = str(get_free_port())
    procs = []
    for r in range(n):
        env = {**ENV, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "gaugeflow.cli.main", "sample", *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate(timeout=300)
        out.append((p.returncode, so, se))
    return out


def flow(cfg_text):
    """Theory and a random-weight flow of the config ``cfg_text`` (float32, as a default training makes)."""
    from gaugeflow.cli.build import model_from_config, theory_from_config
    from gaugeflow.cli.sample import SampleJob

    cfg = OmegaConf.merge(OmegaConf.structured(SampleJob), OmegaConf.create(cfg_text))
    theory = theory_from_config(cfg)
    torch.manual_seed(0)
    return cfg, theory, model_from_config(cfg, theory, torch.float32, torch.device("cpu"))


def expected_chain(cfg, theory, state, seed, n, bs, world):
    """The proposals of every rank's stream, in rank order per step, and the chain over them."""
    from gaugeflow.cli.build import model_from_config
    from gaugeflow.distributed.init import rank_seed
    from gaugeflow.sampling.imh import IndependenceMetropolis, block_entries

    model = model_from_config(cfg, theory, torch.float64, torch.device("cpu"))
    model.load_state_dict(state)
    model.eval()
    gens = [torch.Generator().manual_seed(rank_seed(seed, r)) for r in range(world)]
    imh = IndependenceMetropolis(torch.Generator().manual_seed(_imh_seed(seed)))
    xs, lqs, currents, accepted, crossing = [], [], [], [], 0
    done = 0
    with torch.no_grad():
        while done < n:
            mine = min(bs, -(-(n - done) // world))
            b = min(mine * world, n - done)
            draws = [model.sample(mine, g) for g in gens]
            x = torch.cat([d[0] for d in draws])[:b]
            lq = torch.cat([d[1] for d in draws])[:b]
            acc, cur = imh.step(-theory.action(x) - lq)
            for r, e in enumerate(block_entries(cur, done, mine, world)):
                # a configuration another rank drew (this step or carried over) enters this block
                if e.entering is not None and (e.entering < done or (e.entering - done) // mine != r):
                    crossing += 1
            xs.append(x), lqs.append(lq), currents.append(cur), accepted.append(acc)
            done += b
    return torch.cat(xs), torch.cat(lqs), torch.cat(currents), torch.cat(accepted), crossing


def test_two_ranks_write_the_chain_of_their_streams(tmp_path):
    cfg, theory, model = flow(SAVED)
    state = model.state_dict()
    save_checkpoint(tmp_path / "ck", 1, model=state, theory="u1_2d", config=SAVED + "train: {dtype: float32}\n")
    seed, n, bs = 4, 45, 8  # steps of 2 x 8 and a last one of 7 + 6: uneven shares
    res = launch(2, "checkpoint=ck", f"sample.n={n}", f"sample.batch_size={bs}", f"seed={seed}", "dist=ddp",
                 "dist.device=cpu", "dist.timeout_s=60", "out=ens.h5", "hydra.run.dir=run", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in res), [se for _, _, se in res]
    assert "wrote 45 configurations" in res[0][1] and res[1][1] == ""  # only rank 0 reports

    x, lq, cur, acc, crossing = expected_chain(cfg, theory, {k: v.clone() for k, v in state.items()}, seed, n, bs, 2)
    assert crossing >= 2, crossing  # configurations did travel between ranks in this run
    ens = read_ensemble(tmp_path / "ens.h5")
    c = ens.columns
    assert np.array_equal(c["proposal"], cur.numpy()) and np.array_equal(c["accepted"], acc.numpy())
    assert ens.fields.dtype == np.complex128 and ens.fields.shape == (45, 2, 4, 4, 1, 1)
    assert np.allclose(ens.fields, x[cur].numpy(), rtol=0, atol=1e-12)
    assert np.allclose(c["log_q"], lq[cur].numpy(), rtol=0, atol=1e-10)
    assert np.allclose(c["log_p"], -theory.action(torch.from_numpy(ens.fields)).numpy(), rtol=0, atol=1e-10)
    want_q = theory.measure(torch.from_numpy(ens.fields))["topological_charge"].numpy()
    assert np.array_equal(c["topological_charge"], want_q)

    # one file for plain h5py; its configurations lie in the ranks' part files, each rank's share
    with h5py.File(tmp_path / "ens.h5") as f:
        ds = f["links"]
        assert ds.is_virtual and ds.shape == (45, 2, 4, 4, 1, 1) and np.array_equal(ds[()], ens.fields)
        assert np.array_equal(ds[17:23], ens.fields[17:23]) and f.attrs["n_parts"] == 2
        assert sorted(s.file_name for s in ds.virtual_sources()) == [
            "ens.h5.parts/part_00000_of_00002.h5"] * 2 + ["ens.h5.parts/part_00001_of_00002.h5"] * 2
    for r, share in enumerate([8 + 8 + 7, 8 + 8 + 6]):
        part = read_ensemble(tmp_path / part_name(tmp_path / "ens.h5", r, 2))
        assert part.n_cfg == share and part.attrs["rank"] == r and part.attrs["part_of"] == "ens.h5"
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]

    # the file and its parts move together (the parts are found relative to the file)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(tmp_path / "ens.h5", moved / "ens.h5")
    shutil.copytree(tmp_path / "ens.h5.parts", moved / "ens.h5.parts")
    assert np.array_equal(read_ensemble(moved / "ens.h5").fields, ens.fields)

    # analyze reads it like any chain
    from gaugeflow.cli.analyze import AnalyzeJob, run_analyze

    out = run_analyze(OmegaConf.merge(OmegaConf.structured(AnalyzeJob), {"ensemble": str(tmp_path / "ens.h5"),
                                                                          "plots": False}), tmp_path / "an")
    s = out["summary"]
    assert s["plaquette"]["mean"] == pytest.approx(c["plaquette"].mean())
    assert s["topological_susceptibility"]["mean"] == pytest.approx((c["topological_charge"] ** 2).mean() / 16)


def test_virtual_ensemble_over_uneven_parts(tmp_path):
    """Three ranks, steps of 3 x 4 rows then 3 + 3 + 1: the virtual dataset puts every row in place,
    with one mapping per rank and run of equal steps; a missing part reads as NaN, not zeros."""
    world, shape = 3, (2, 3)
    steps = [(4, 12), (4, 12), (4, 12), (3, 7)]  # (rows per rank, rows in the step)
    total = sum(b for _, b in steps)
    rows = np.arange(total * 6, dtype=np.float64).reshape(total, *shape)
    path = tmp_path / "e.h5"
    parts = [part_name(path, r, world) for r in range(world)]
    attrs = {"theory": "phi4_2d", "kind": "scalar", "group": "none", "shape": list(shape)}
    main = VirtualEnsembleWriter(path, "phi", shape, torch.float64, attrs, parts)
    writers = [EnsembleWriter(tmp_path / p, "phi", shape, torch.float64, attrs) for p in parts]
    done = 0
    for block, b in steps:
        for r in range(world):
            k = max(0, min(block, b - r * block))
            if k:
                writers[r].append(torch.from_numpy(rows[done + r * block:done + r * block + k]))
        main.append(b, block, index=np.arange(done, done + b))
        done += b
    for w in writers:
        w.close()
    main.close()
    ens = read_ensemble(path)
    assert ens.n_cfg == total and np.array_equal(ens.fields, rows)
    assert np.array_equal(ens.columns["index"], np.arange(total))
    with h5py.File(path) as f:
        # per rank one strided mapping for the three equal steps and one for the short last step
        assert len(f["phi"].virtual_sources()) == 2 * world
    (tmp_path / parts[1]).unlink()
    with h5py.File(path) as f:
        got = f["phi"][()]
    assert np.isnan(got[4:8]).all() and np.array_equal(got[:4], rows[:4])


def test_merge_runs():
    assert merge_runs([(0, 0, 4)]) == [(0, 4, 1, 4, 0)]
    assert merge_runs([(4, 0, 4), (16, 4, 4), (28, 8, 4)]) == [(4, 12, 3, 4, 0)]
    # a short step ends a group; a new stride starts a new one
    assert merge_runs([(0, 0, 2), (6, 2, 2), (12, 4, 1), (20, 5, 1), (30, 6, 1)]) == [
        (0, 6, 2, 2, 0), (12, 8, 2, 1, 4), (30, 1, 1, 1, 6)]


def test_default_output_lies_in_rank_0s_run_directory(tmp_path):
    # no out= and no hydra.run.dir: every rank writes its part beside rank 0's file; other ranks
    # create no directories of their own
    cfg, theory, model = flow(SAVED)
    save_checkpoint(tmp_path / "ck", 1, model=model.state_dict(), theory="u1_2d",
                    config=SAVED + "train: {dtype: float32}\n")
    res = launch(2, "checkpoint=ck", "sample.n=8", "sample.batch_size=4", "dist=ddp", "dist.device=cpu",
                 "dist.timeout_s=60", cwd=tmp_path)
    assert all(rc == 0 for rc, _, _ in res), [se for _, _, se in res]
    files = list((tmp_path / "outputs" / "sample").glob("*/*/ensemble.h5"))
    assert len(files) == 1 and len(list((tmp_path / "outputs" / "sample").glob("*/*"))) == 1
    assert read_ensemble(files[0]).fields.shape[0] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "outputs"]
