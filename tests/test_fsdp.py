"""FSDP2 / data-parallel training and sharded checkpoints against single-process runs.

The test starts 2 and 4 CPU processes (gloo) itself, forked where the platform can (as in
test_domain.py). Each rank draws its part of the batch from its own generator, seeded with
``rank_seed(SEED, rank)``; the parent draws the same per-rank batches, concatenates them and
trains one unsharded model on the global batch: the reference. In float64 the sharded run
differs from it only by summation order (the reduce-scatter adds the ranks' gradient means;
the reference sums the global batch at once), about 1e-16 relative per step; three Adam steps
with lr 1e-2 keep that below 1e-13, so ``TOL`` (1e-10 relative) cannot hide a real difference
(a wrong average over ranks or a missing all-gather changes parameters by 1e-3 or more).

Checked: FSDP2 training (3 steps of reverse KL with Adam) equals the reference, with and without
activation checkpointing (gradients bitwise equal to the plain FSDP run's, and layers really
recompute); plain data parallel via ``allreduce_gradients`` (several buckets) equals it too;
metrics reduced over ranks give the global batch's loss and ESS; the path-gradient loss under
FSDP equals the single-process path gradient; mixed precision runs the networks in float32 with
float64 master weights; sharded checkpoints written by 2 ranks load on 2 ranks (bitwise, and
training continues identically), in the parent (1 process) and on 4 ranks (uneven shards, some
empty), and export to a single file that ``load_checkpoint`` reads; an unsharded (DDP)
checkpoint loads into an FSDP model; a 2 x 2 HSDP mesh trains like the reference and stores each
replicated box once; a rank failing to write makes every rank raise; broken checkpoints give a
one-line ``CheckpointError`` naming the file. All 2-rank checks share one start of the
processes, all 4-rank checks another (fork: about 1 s each).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil

import h5py
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gaugeflow.distributed.fsdp import (
    allreduce_gradients,
    clip_grad_norm,
    is_sharded,
    reduce_metrics,
    shard_flow_model,
)
from gaugeflow.distributed.init import rank_seed
from gaugeflow.flows import models
from helpers import theory_flow
from gaugeflow.io.checkpoint import CheckpointError, load_checkpoint
from gaugeflow.io.sharded import (
    export_consolidated,
    list_any_checkpoints,
    load_sharded,
    resolve_any_checkpoint,
    save_sharded,
    sharded_path,
)
from gaugeflow.sampling.weights import effective_sample_size
from gaugeflow.components import build_theory
from gaugeflow.train.losses import path_gradient
from torch.distributed.elastic.utils.distributed import get_free_port

TOL = dict(rtol=1e-10, atol=1e-12)
SEED = 11
SHAPE = (4, 4)
HIDDEN = (6,)  # 6 output channels: even shards on 2 ranks, uneven (2, 2, 2, 0) on 4
N_LAYERS = 2
LOCAL_BATCH = 4
STEPS = 3
LR = 1e-2
CONFIG = "theory:\n  name: u1\n"


def _theory():
    return build_theory(dict(name="u1", _target_="gaugeflow.theories.gauge_theory", group="u1", beta=2.0, dim=len(SHAPE)), SHAPE)


def _model(init_seed: int = 0, hidden=HIDDEN):
    # default (random) initialisation: every parameter has a non-zero gradient from step 1
    torch.manual_seed(init_seed)
    return theory_flow(_theory(), n_layers=N_LAYERS, hidden=hidden, dtype=torch.float64)


def _generators(world):
    return [torch.Generator().manual_seed(rank_seed(SEED, r)) for r in range(world)]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state(model):
    return {k: _full(v).detach().clone() for k, v in model.state_dict().items()}


def _optim_by_name(model, opt):
    names = [n for n, _ in model.named_parameters()]
    return {names[i]: {k: _full(v).detach().clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}


# -- single-process reference (parent) ------------------------------------------------------

def _reference(world):
    theory, model = _theory(), _model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gens = _generators(world)
    out = {"loss": [], "ess": [], "norm": []}
    for step in range(STEPS):
        # FlowModel.sample, for the concatenation of every rank's prior draws
        z = torch.cat([model.prior.sample(LOCAL_BATCH, g) for g in gens])
        x, logdet = model.flow(z)
        log_q = model.prior.log_prob(z) - logdet
        s = theory.action(x)
        loss = (log_q + s).mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            out["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
        out["norm"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
        opt.step()
        out["loss"].append(loss.item())
        out["ess"].append(effective_sample_size(-s - log_q.detach()).item())
    out["state"] = _state(model)
    out["optim"] = _optim_by_name(model, opt)
    # the path gradient at the initial weights, on the first global batch
    fresh = _model()
    z = torch.cat([fresh.prior.sample(LOCAL_BATCH, g) for g in _generators(world)])
    x, logdet = fresh.flow(z)
    log_q = fresh.prior.log_prob(z) - logdet
    score = fresh.log_prob(x.detach())
    (log_q + theory.action(x) - score).mean().backward()
    out["path_grads"] = {k: p.grad.clone() for k, p in fresh.named_parameters()}
    return out


# -- the processes ---------------------------------------------------------------------------

def _close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}: {m}")


def _matches_reference(state, model, opt, ref, where):
    """A loaded model's parameters (``state``) and optimizer state equal the reference run's."""
    for k, v in state.items():
        _close(v, ref["state"][k], f"{where}: parameter {k}")
    got = _optim_by_name(model, opt)
    for name, st in ref["optim"].items():
        for key, v in st.items():
            _close(got[name][key], v, f"{where}: optimizer {key} of {name}")


def _train(model, opt, gen, theory, ref, reduce=None, record=None):
    """STEPS of reverse KL on this rank's batch; checks losses, ESS and gradient norms."""
    for step in range(STEPS):
        x, log_q = model.sample(LOCAL_BATCH, gen)
        s = theory.action(x)
        loss = (log_q + s).mean()
        opt.zero_grad()
        loss.backward()
        if reduce is not None:
            reduce(model.parameters())
        if step == 0 and record is not None:
            record.update({k: _full(p.grad).clone() for k, p in model.named_parameters()})
        norm = clip_grad_norm(model.parameters(), None)
        opt.step()
        m = reduce_metrics({"log_q": log_q.detach(), "action": s.detach(), "loss": loss.detach()})
        assert m["log_q"].shape == (LOCAL_BATCH * dist.get_world_size(),)
        _close(torch.tensor(m["loss"]), torch.tensor(ref["loss"][step]), f"global loss at step {step}")
        ess = effective_sample_size(-m["action"] - m["log_q"])
        _close(ess, torch.tensor(ref["ess"][step], dtype=ess.dtype), f"global ESS at step {step}")
        _close(norm, torch.tensor(ref["norm"][step], dtype=norm.dtype), f"gradient norm at step {step}")


def _sharded_model(**kw):
    return shard_flow_model(_model(**{k: kw.pop(k) for k in ("init_seed",) if k in kw}), **kw)


def _check_training(rank, world, ref, run_dir):
    theory = _theory()

    # FSDP2: parameters are Shard(0) DTensors, each rank holding its chunk
    model = _sharded_model()
    assert is_sharded(model)
    for name, p in model.named_parameters():
        assert [str(pl) for pl in p.placements] == ["S(0)"], name
        chunks = torch.arange(p.shape[0]).chunk(world)  # torch.chunk's sizes: 6 on 4 ranks -> 2, 2, 2, 0
        assert p.to_local().shape[0] == (len(chunks[rank]) if rank < len(chunks) else 0), name
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(rank_seed(SEED, rank))
    grads = {}
    _train(model, opt, gen, theory, ref, record=grads)
    for k, v in _state(model).items():
        _close(v, ref["state"][k], f"FSDP parameter {k} after {STEPS} steps")
    for k, g in grads.items():
        _close(g, ref["grads"][k], f"FSDP gradient of {k}")

    # with activation checkpointing: the same gradients bit for bit, and the networks run twice
    ac = _sharded_model(activation_checkpointing=True)
    calls = [0]
    for layer in ac.flow.layers:
        layer.net.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    opt_ac = torch.optim.Adam(ac.parameters(), lr=LR)
    gen_ac = torch.Generator().manual_seed(rank_seed(SEED, rank))
    grads_ac = {}
    _train(ac, opt_ac, gen_ac, theory, ref, record=grads_ac)
    assert calls[0] == 2 * N_LAYERS * STEPS, f"{calls[0]} network calls: activations were not recomputed"
    for k in grads:
        assert torch.equal(grads_ac[k], grads[k]), f"activation checkpointing changed the gradient of {k}"
    for k, v in _state(ac).items():
        _close(v, ref["state"][k], f"FSDP + checkpointing parameter {k}")
    with torch.no_grad():  # sampling without grad (evaluation) goes through the same wrappers
        ac.sample(2, torch.Generator().manual_seed(0))

    # plain data parallel: bucketed all-reduce, buckets of ~100 bytes to force several
    ddp = _model()
    opt_ddp = torch.optim.Adam(ddp.parameters(), lr=LR)
    gen_ddp = torch.Generator().manual_seed(rank_seed(SEED, rank))
    _train(ddp, opt_ddp, gen_ddp, theory, ref, reduce=lambda ps: allreduce_gradients(ps, bucket_mb=1e-4))
    for k, v in _state(ddp).items():
        _close(v, ref["state"][k], f"DDP parameter {k}")
    # an unsharded (DDP) checkpoint: rank 0 writes the tensors; it loads into an FSDP model
    ddp_dir = run_dir + "_ddp"
    save_sharded(ddp_dir, STEPS, ddp, opt_ddp, rng_states_this_rank={"sampler": gen_ddp.get_state()})
    into = _sharded_model(init_seed=8)
    opt_into = torch.optim.Adam(into.parameters(), lr=LR)
    load_sharded(ddp_dir, into, opt_into)
    _matches_reference(_state(into), into, opt_into, ref, "DDP checkpoint loaded into FSDP")

    # the path gradient works under FSDP (functional_call's detached parameters would not);
    # here with parameters kept gathered from forward to backward (ZeRO-2), which an evaluation
    # pass under no_grad must not leave gathered
    pg = _sharded_model(reshard_after_forward=False)
    with torch.no_grad():
        pg.sample(2, torch.Generator().manual_seed(0))
    assert all(hasattr(p, "placements") for p in pg.parameters()), "no_grad pass left the model unsharded"
    out = path_gradient(pg, theory.action, LOCAL_BATCH, torch.Generator().manual_seed(rank_seed(SEED, rank)))
    out.loss.backward()
    for k, p in pg.named_parameters():
        _close(_full(p.grad), ref["path_grads"][k], f"FSDP path gradient of {k}")

    # mixed precision: float32 networks, float64 master weights and gradients
    mp_model = _sharded_model(param_dtype=torch.float32, reduce_dtype=torch.float64)
    x, log_q = mp_model.sample(LOCAL_BATCH, torch.Generator().manual_seed(rank_seed(SEED, rank)))
    loss = (log_q + theory.action(x)).mean()
    loss.backward()
    mean = reduce_metrics({"loss": loss.detach()})["loss"]
    rel = abs(mean - ref["loss"][0]) / abs(ref["loss"][0])
    assert 1e-12 < rel < 1e-5, f"mixed-precision loss off by {rel:.2e} (relative)"
    assert log_q.dtype == torch.float64 and x.dtype == torch.complex128
    for name, p in mp_model.named_parameters():
        assert p.dtype == torch.float64 and p.grad.dtype == torch.float64, name

    # metrics: rows of unequal length and complex values gather in rank order
    rows = torch.full((rank + 1,), complex(rank, -rank), dtype=torch.complex128)
    got = reduce_metrics({"w": rows, "n": rank})
    assert got["w"].tolist() == [complex(r, -r) for r in range(world) for _ in range(r + 1)]
    assert got["n"] == (world - 1) / 2
    return model, opt, gen


def _check_sharded_checkpoint(rank, world, model, opt, gen, run_dir):
    """Save from 2 ranks, load on 2 ranks into a differently initialised model, continue."""
    sched = {"lambda_lr": {"last_epoch": STEPS, "base_lrs": [LR]}}
    path = save_sharded(run_dir, STEPS, model, opt, sched_state=sched, rng_states_this_rank={"sampler": gen.get_state()},
                        theory="u1", config=CONFIG)
    assert path == sharded_path(run_dir, STEPS) and path.is_dir()
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    # one rank failing to write: every rank raises, naming it; nothing half-written remains
    bad = {"sampler": object()} if rank == 1 else {"sampler": gen.get_state()}
    with pytest.raises(CheckpointError, match="writing failed on rank 1"):
        save_sharded(run_dir, STEPS + 1, model, opt, rng_states_this_rank=bad)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    other = _sharded_model(init_seed=5)
    opt2 = torch.optim.Adam(other.parameters(), lr=0.5)
    ck = load_sharded(run_dir, other, opt2)
    assert (ck.step, ck.form, ck.saved_world_size, ck.theory, ck.config) == (STEPS, "sharded", world, "u1", CONFIG)
    assert ck.sched == sched and torch.equal(ck.rng["sampler"], gen.get_state())
    for (k, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), f"reloaded shard of {k}"
    for (i, a), (j, b) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        for key in a:
            va, vb = a[key], b[key]
            assert type(va) is type(vb) and torch.equal(getattr(va, "_local_tensor", va), getattr(vb, "_local_tensor", vb))
    assert opt2.param_groups[0]["lr"] == LR
    # one more step from each: identical
    gen2 = torch.Generator()
    gen2.set_state(ck.rng["sampler"])
    theory = _theory()
    for m, o, g in ((model, opt, gen), (other, opt2, gen2)):
        x, log_q = m.sample(LOCAL_BATCH, g)
        o.zero_grad()
        (log_q + theory.action(x)).mean().backward()
        o.step()
    for (k, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), f"step after resume differs in {k}"


def _check_reshard_load(rank, world, ref, run_dir):
    """A checkpoint written by another world size loads into this one (uneven shards)."""
    model = _sharded_model(init_seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ck = load_sharded(run_dir, model, opt)
    assert ck.saved_world_size == 2 and (ck.rng is None) == (rank >= 2)
    _matches_reference(_state(model), model, opt, ref, f"loaded on {world} ranks")


def _check_hsdp(rank, world, ref, run_dir):
    """2 x 2 mesh (replicate x shard): trains like the reference; each box is saved once."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = shard_flow_model(_model(), mesh=mesh)
    assert [str(pl) for pl in next(model.parameters()).placements] == ["R", "S(0)"]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    _train(model, opt, torch.Generator().manual_seed(rank_seed(SEED, rank)), _theory(), ref)
    for k, v in _state(model).items():
        _close(v, ref["state"][k], f"HSDP parameter {k}")
    save_sharded(run_dir, STEPS, model, opt, rng_states_this_rank={"sampler": torch.Generator().get_state()})


def _worker(rank, world, port, ref, run_dir, job):
    torch.set_num_threads(1)  # also: a forked child must not touch the parent's OpenMP pool
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # a collective that never completes fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        if job == "train+save":
            model, opt, gen = _check_training(rank, world, ref, run_dir)
            _check_sharded_checkpoint(rank, world, model, opt, gen, run_dir)
        elif job == "train+reshard":
            _check_training(rank, world, ref, run_dir)
            _check_reshard_load(rank, world, ref[2], run_dir)
            _check_hsdp(rank, world, ref, run_dir + "_hsdp")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(world, *args):
    # fork: the processes inherit the imported torch and gaugeflow (seconds saved per start)
    method = "fork" if "fork" in mp.get_all_start_methods() and not dist.is_initialized() else "spawn"
    mp.start_processes(_worker, args=(world, get_free_port(), *args), nprocs=world, join=True, start_method=method)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Train and save on 2 ranks; the run directory and the 2-rank reference."""
    run_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    ref = _reference(2)
    _launch(2, ref, str(run_dir), "train+save")
    return run_dir, ref


# -- tests -------------------------------------------------------------------------------------

def test_two_ranks_fsdp_ddp_and_sharded_checkpoint(two_rank_run):
    run_dir, ref = two_rank_run
    step_dir = sharded_path(run_dir, STEPS)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == STEPS and manifest["theory"] == "u1"
    assert manifest["config"] == CONFIG and manifest["gaugeflow_version"]
    assert sorted(p.name for p in step_dir.iterdir()) == ["manifest.json", "shard_0.h5", "shard_1.h5"]
    w = manifest["tensors"]["model/flow.layers.0.net.net.0.weight"]
    from gaugeflow.flows.u1 import U1PlaquetteCoupling

    n_in = U1PlaquetteCoupling.n_context(2, rectangles=True)  # cos, sin of frozen plaquettes and 2x1 loops
    assert w["placements"] == ["Shard(0)"] and w["shape"] == [HIDDEN[0], n_in, 3, 3]
    assert [(s["rank"], s["offset"][0], s["shape"][0]) for s in w["shards"]] == [(0, 0, 3), (1, 3, 3)]
    step_entry = manifest["tensors"]["optim/flow.layers.0.net.net.0.weight/step"]
    assert step_entry["shape"] == [] and [s["rank"] for s in step_entry["shards"]] == [0]
    # each rank's file holds only its half: no rank gathered the model
    with h5py.File(step_dir / "shard_1.h5", "r") as f:
        assert f["tensors/model/flow.layers.0.net.net.0.weight"].shape == (3, n_in, 3, 3)
        assert "meta" not in f and f.attrs["save_id"] == manifest["save_id"]

    # world size 1: a plain model and optimizer, loaded in this process
    model = _model(init_seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ck = load_sharded(step_dir, model, opt)
    assert ck.rng is not None and ck.saved_world_size == 2
    _matches_reference(model.state_dict(), model, opt, ref, "loaded on 1 process")

    # consolidated single file, read by io.checkpoint and usable by a plain training run
    out = export_consolidated(step_dir)
    assert out == run_dir / "checkpoints" / f"step_{STEPS:08d}.h5"
    single = load_checkpoint(out)
    assert single.step == STEPS and single.theory == "u1" and single.config == CONFIG
    assert set(single.rng) == {"sampler", "sampler_rank1"} and torch.equal(single.rng["sampler"], ck.rng["sampler"])
    plain = _model(init_seed=4)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=LR)
    plain.load_state_dict(single.model)
    plain_opt.load_state_dict(single.optim)
    for k, v in model.state_dict().items():
        assert torch.equal(single.model[k], v), k
    got = _optim_by_name(model, opt)
    assert _optim_by_name(plain, plain_opt).keys() == got.keys()
    for name, st in got.items():
        for key, v in st.items():
            assert torch.equal(_optim_by_name(plain, plain_opt)[name][key], v)
    # the single file loads through load_sharded too (e.g. an FSDP run resuming from it)
    again = _model(init_seed=6)
    again_opt = torch.optim.Adam(again.parameters(), lr=LR)
    ck1 = load_sharded(out, again, again_opt, rank=1)
    assert ck1.form == "file" and torch.equal(ck1.rng["sampler"], single.rng["sampler_rank1"])
    for k, v in again.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_run_directory_resolution_and_pruning(two_rank_run, tmp_path):
    src, _ = two_rank_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    export_consolidated(sharded_path(run_dir, STEPS))
    # both forms of step 3: the directory counts as the latest
    assert resolve_any_checkpoint(run_dir) == sharded_path(run_dir, STEPS)
    assert resolve_any_checkpoint(run_dir / "checkpoints" / "step_00000003.h5").is_file()
    # single process: no process group needed; later steps, keep the newest 2 steps
    model = _model()
    for step in (4, 5):
        save_sharded(run_dir, step, model, None, rng_states_this_rank={"sampler": torch.Generator().get_state()},
                     theory="u1", config=CONFIG, keep=2)
    assert [p.name for p in list_any_checkpoints(run_dir)] == ["step_00000004", "step_00000005"]
    save_sharded(run_dir, 5, model, None, theory="u1")  # the same step again replaces it
    assert resolve_any_checkpoint(run_dir) == sharded_path(run_dir, 5)
    ck = load_sharded(run_dir, _model(init_seed=9))
    assert ck.step == 5 and ck.saved_world_size == 1 and ck.rng == {}
    with pytest.raises(CheckpointError, match="no checkpoints"):
        resolve_any_checkpoint(tmp_path)


def _one_line_error(spec, match, **kw):
    with pytest.raises(CheckpointError) as info:
        load_sharded(spec, _model(**kw))
    text = str(info.value)
    assert "\n" not in text and match in text, text
    return text


def test_broken_checkpoints_are_one_line_errors(two_rank_run, tmp_path):
    src, _ = two_rank_run
    good = sharded_path(src, STEPS)

    def copy(name):
        d = tmp_path / name / "checkpoints" / good.name
        shutil.copytree(good, d)
        return d

    d = copy("corrupt")
    (d / "shard_1.h5").write_bytes(b"not an hdf5 file" * 10)
    _one_line_error(d, "shard_1.h5")
    d = copy("truncated")
    data = (d / "shard_0.h5").read_bytes()
    (d / "shard_0.h5").write_bytes(data[: len(data) // 2])
    _one_line_error(d, "shard_0.h5")
    d = copy("missing")
    (d / "shard_1.h5").unlink()
    _one_line_error(d, "shard_1.h5: missing shard")
    d = copy("nomanifest")
    (d / "manifest.json").unlink()
    _one_line_error(d, "manifest.json: missing manifest")
    d = copy("badmanifest")
    (d / "manifest.json").write_text('{"format": "gaugeflow-sharded-checkpoint", "world_')
    _one_line_error(d, "manifest.json: corrupt manifest")
    d = copy("mixed")  # a shard of another save of the same step
    other = tmp_path / "other"
    save_sharded(other, STEPS, _model(), None)
    shutil.copy(sharded_path(other, STEPS) / "shard_0.h5", d / "shard_0.h5")
    _one_line_error(d, "shard of another save")
    _one_line_error(good, "does not fit this model", hidden=(4,))


def test_four_ranks_fsdp_hsdp_and_resharding(two_rank_run):
    # 4 ranks train on their own global batch, load the 2-rank checkpoint (shards 2, 2, 2, 0),
    # and train and save on a 2 x 2 (replicate x shard) mesh
    run_dir, ref2 = two_rank_run
    ref = _reference(4)
    _launch(4, {**ref, 2: ref2}, str(run_dir), "train+reshard")
    hsdp = sharded_path(str(run_dir) + "_hsdp", STEPS)
    manifest = json.loads((hsdp / "manifest.json").read_text())
    w = manifest["tensors"]["model/flow.layers.0.net.net.0.weight"]
    assert w["placements"] == ["Replicate()", "Shard(0)"] and manifest["mesh"]["shape"] == [2, 2]
    assert [(s["rank"], s["offset"][0]) for s in w["shards"]] == [(0, 0), (1, 3)]  # replicas 2, 3 not stored
    model = _model(init_seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    load_sharded(hsdp, model, opt)
    _matches_reference(model.state_dict(), model, opt, ref, "HSDP loaded on 1 process")


def _path_gradient_reference(model, action, batch_size, generator):
    """The path gradient the other way: log q re-evaluated with detached parameters (functional_call)."""
    from torch.func import functional_call

    from gaugeflow.train.losses import LossOutput

    class LogProb(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, x):
            return self.model.log_prob(x)

    x, log_q = model.sample(batch_size, generator)
    state = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    state.update({f"model.{k}": v for k, v in model.named_buffers()})
    lq = functional_call(LogProb(model), state, (x,))
    s = action(x)
    return LossOutput((lq + s).mean(), log_q.detach(), s.detach(), x.detach())


def test_single_process_helpers(gen):
    # without a process group: no-ops and identities; the path-gradient loss equals losses.path_gradient
    theory, model = _theory(), _model()
    x, log_q = model.sample(3, gen)
    (log_q.sum()).backward()
    before = [p.grad.clone() for p in model.parameters()]
    allreduce_gradients(model.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    m = reduce_metrics({"log_q": log_q.detach(), "loss": torch.tensor(2.5)})
    assert torch.equal(m["log_q"], log_q.detach()) and m["loss"] == 2.5
    grads = []
    for loss in (_path_gradient_reference, path_gradient):
        model.zero_grad()
        out = loss(model, theory.action, 4, torch.Generator().manual_seed(3))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        _close(b, a, "losses.path_gradient against the functional_call reference")
