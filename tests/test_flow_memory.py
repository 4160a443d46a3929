"""Activation memory that does not grow with the layers' internals (tools/flow_memory.py):
per-layer checkpointing keeps one field per layer, and its gradients equal plain autograd's."""

import importlib.util
import pathlib

import torch

SPEC = importlib.util.spec_from_file_location("flow_memory", pathlib.Path(__file__).parents[1] / "tools" / "flow_memory.py")
flow_memory = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(flow_memory)


def test_checkpointed_flows_keep_a_field_per_layer_and_the_same_gradients():
    shape = [2, 2, 2, 2]
    rows = {n: flow_memory.measure("su2", shape, n, 2, torch.float64, hidden=(4,)) for n in (2, 4)}
    for r in rows.values():
        assert r["max_relative_gradient_difference"] <= 1e-10
        assert r["checkpointed_mib_per_configuration"] < r["plain_mib_per_configuration"] / 3
    # two more layers cost two layer inputs (a complex128 link field of 2^4 SU(2): 4 * 16 * 4 * 16 bytes),
    # with room for the per-layer bookkeeping the checkpoint keeps; the plain model pays its activations
    field_mib = 4 * 16 * 4 * 16 / 2**20
    grow_ckpt = rows[4]["checkpointed_mib_per_configuration"] - rows[2]["checkpointed_mib_per_configuration"]
    grow_plain = rows[4]["plain_mib_per_configuration"] - rows[2]["plain_mib_per_configuration"]
    assert grow_ckpt <= 2 * 3 * field_mib and grow_plain > 5 * grow_ckpt
