#!/usr/bin/env python
"""Activation memory of a flow's training step, plain and checkpointed per layer, and its gradients.

The reverse-KL step keeps, for the backward pass, every tensor autograd saves in the forward
pass (the *activations*). This tool counts them exactly with
``torch.autograd.graph.saved_tensors_hooks`` (bytes of distinct storages saved, per
configuration), for the plain model and with every coupling layer checkpointed
(``dist.activation_checkpointing=true``: ``torch.utils.checkpoint`` keeps a layer's input and
recomputes the rest in backward, so memory no longer grows with the layers' internals, only by
one field per layer). It also compares the two models' parameter gradients (same weights, same
draws) in float64: they must agree to rounding.

Example (the 4d benchmark flow)::

    python tools/flow_memory.py --group su3 --shape 4 4 4 4 --layers 32 --batch 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


class SavedBytes:
    """Bytes of the distinct storages autograd saves while active."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        try:
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def step(model, theory, batch: int, seed: int) -> tuple[int, dict[str, torch.Tensor], float]:
    """Saved bytes, parameter gradients and seconds of one reverse-KL step."""
    from gaugeflow.train.losses import reverse_kl

    model.zero_grad(set_to_none=True)
    saved = SavedBytes()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out = reverse_kl(model, theory.action, batch, torch.Generator().manual_seed(seed))
    out.loss.backward()
    seconds = time.perf_counter() - t0
    return saved.total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, seconds


def measure(group: str, shape: list[int], layers: int, batch: int, dtype: torch.dtype, seed: int = 0,
            hidden=(32, 32)) -> dict:
    from gaugeflow.distributed.fsdp import apply_activation_checkpointing
    from gaugeflow.flows import models
    from gaugeflow.theories import gauge_theory

    theory = gauge_theory(shape, group, 2.0)
    torch.manual_seed(seed)
    build = models.u1_equivariant if theory.group.N == 1 else models.sun_spectral
    plain = build(theory, dtype, n_layers=layers, hidden=hidden)
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain))
    b_plain, g_plain, t_plain = step(plain, theory, batch, seed)
    b_ckpt, g_ckpt, t_ckpt = step(ckpt, theory, batch, seed)
    worst = max(((g_plain[n] - g_ckpt[n]).abs().max() / g_plain[n].abs().max().clamp_min(1e-300)).item()
                for n in g_plain)
    mib = 2.0**20
    return {"group": group, "shape": shape, "layers": layers, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in plain.parameters()),
            "plain_mib_per_configuration": b_plain / batch / mib, "checkpointed_mib_per_configuration": b_ckpt / batch / mib,
            # in backward one layer at a time is recomputed: its activations join the kept inputs
            "checkpointed_peak_mib_per_configuration": (b_ckpt + b_plain / layers) / batch / mib,
            "plain_seconds": t_plain, "checkpointed_seconds": t_ckpt, "max_relative_gradient_difference": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", default="su3")
    p.add_argument("--shape", type=int, nargs="+", default=[4, 4, 4, 4])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in args.layers:
        r = measure(args.group, args.shape, n, args.batch, dtype)
        rows.append(r)
        print(f"{args.group} {args.shape} {n:3d} layers ({r['parameters']} parameters, {args.dtype}): activations "
              f"{r['plain_mib_per_configuration']:.1f} MiB per configuration plain, "
              f"{r['checkpointed_mib_per_configuration']:.2f} MiB checkpointed (peak with one layer recomputed "
              f"{r['checkpointed_peak_mib_per_configuration']:.2f} MiB); step {r['plain_seconds']:.2f} s vs "
              f"{r['checkpointed_seconds']:.2f} s; gradients differ by {r['max_relative_gradient_difference']:.1e} (relative)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
