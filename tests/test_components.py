"""Components built from config nodes by ``_target_`` (gaugeflow.components, docs/extending.md)."""

import pathlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gaugeflow.cli.build import model_from_config, resolve_model_config, theory_from_config
from gaugeflow.cli.common import CONFIG_DIR
from gaugeflow.cli.main import checkpoint_overrides, model_aliases
from gaugeflow.components import build_model, build_theory, check_keys, upgrade_model, upgrade_theory
from gaugeflow.errors import UsageError

import gaugeflow.cli.train  # noqa: F401  (registers train_schema)

THEORIES = sorted(p.stem for p in (pathlib.Path(CONFIG_DIR) / "theory").glob("*.yaml"))
ARCHS = sorted(p.stem for p in (pathlib.Path(CONFIG_DIR) / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (pathlib.Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
#: the field spaces each built-in architecture is for
FAMILY = {"gaugeflow.flows.models.affine": {"scalar"}, "gaugeflow.flows.models.spline": {"scalar"},
          "gaugeflow.flows.models.u1_equivariant": {"u1"}, "gaugeflow.flows.models.sun_spectral": {"sun"},
          "gaugeflow.flows.models.residual": {"u1", "sun"}, "gaugeflow.flows.continuous.continuous": {"u1", "sun"},
          "gaugeflow.flows.joint.joint": {"pseudofermion"}}
#: a theory of each field space, with the overrides it needs
THEORY_FOR = {"scalar": ["theory=phi4_2d"], "u1": ["theory=u1_2d"], "sun": ["theory=su2_2d"],
              "pseudofermion": ["theory=schwinger_2d", "theory.fermions=pseudofermion"]}


def composed(*overrides, job="train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=job, overrides=list(overrides))


def tiny(cfg):
    cfg.lattice.shape = [4] * len(cfg.lattice.shape) if len(cfg.lattice.shape) == 2 else [2] * len(cfg.lattice.shape)
    return cfg


def family(theory):
    return "scalar" if not theory.is_gauge else ("u1" if theory.group.N == 1 else "sun")


@pytest.mark.parametrize("name", THEORIES)
def test_each_theory_preset_names_its_flow_and_both_build(name):
    cfg = tiny(composed(f"theory={name}", "model_size=small"))
    theory = theory_from_config(cfg)
    assert theory.name == name and family(theory) in FAMILY[cfg.model._target_]
    resolve_model_config(cfg, theory)
    # the recorded node names the builder and every key it takes, the theory-dependent ones filled
    assert cfg.model.n_layers == 8 and None not in OmegaConf.to_container(cfg.model).values()
    model = model_from_config(cfg, theory, torch.float64, torch.device("cpu"))
    x, log_q = model.sample(2, torch.Generator().manual_seed(0))
    assert x.shape == theory.field_shape(2) and torch.allclose(model.log_prob(x), log_q, atol=1e-8)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_composes_and_builds_for_its_field_space(arch):
    families = FAMILY[composed(f"model={arch}").model._target_]
    for fam in sorted(families):
        # model_size sets n_layers and hidden: for the architectures that have them (not continuous)
        size = ["model_size=small"] if "n_layers" in composed(f"model={arch}").model else []
        cfg = tiny(composed(*THEORY_FOR[fam], f"model={arch}", *size))
        theory = theory_from_config(cfg)
        model_from_config(cfg, theory, torch.float32, torch.device("cpu"))
    # on another field space the builder refuses in one line
    # (a marginal gauge flow also serves a theory with fermions: only the joint model is refused elsewhere)
    for fam in sorted(set(THEORY_FOR) - families - (set() if "pseudofermion" in families else {"pseudofermion"})):
        other = tiny(composed(*THEORY_FOR[fam], f"model={arch}"))
        with pytest.raises(UsageError, match=r"model=\w+ (needs|is for|samples)"):
            model_from_config(other, theory_from_config(other), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_set_no_architecture_keys(experiment):
    text = (pathlib.Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text()
    assert "\nmodel:" not in text
    base = composed(f"experiment={experiment}")
    fam = FAMILY[base.model._target_]
    for arch in ARCHS:
        cfg = composed(f"experiment={experiment}", f"model={arch}")
        if fam & FAMILY[cfg.model._target_]:  # any architecture of the field space composes on top
            assert cfg.model._target_ == composed(f"model={arch}").model._target_
            assert cfg.theory == base.theory and cfg.train == base.train


def test_misspelt_keys_fail_naming_them():
    with pytest.raises(ConfigCompositionException, match="model.n_layer"):
        composed("model.n_layer=3")
    with pytest.raises(ConfigCompositionException, match="theory.bta"):
        composed("theory.bta=3")
    cfg = tiny(composed("+model.depth=3"))
    with pytest.raises(UsageError, match=r"^model.depth is not a key of model \(gaugeflow.flows.models.u1_equivariant\); "
                                         r"its keys: n_layers, hidden"):
        resolve_model_config(cfg, theory_from_config(cfg))
    cfg = tiny(composed("+theory.h=3"))
    with pytest.raises(UsageError, match=r"^theory.h is not a key of theory=u1_2d \(gaugeflow.theories.gauge_theory\)"):
        theory_from_config(cfg)
    with pytest.raises(UsageError, match=r"^theory._target_='nowhere.builder' cannot be imported"):
        build_theory({"_target_": "nowhere.builder", "name": "x"}, [4, 4])
    with pytest.raises(UsageError, match=r"^theory.beta must be set"):
        build_theory({"_target_": "gaugeflow.theories.gauge_theory", "name": "x", "group": "u1"}, [4, 4])


def test_check_keys_reads_the_signature():
    def builder(theory, dtype, *, width: int, depth: int = 2):
        return width, depth

    check_keys(builder, {"width": 3}, "model", given=("theory", "dtype"))
    with pytest.raises(UsageError, match="model.width must be set"):
        check_keys(builder, {}, "model", given=("theory", "dtype"))
    with pytest.raises(UsageError, match="model.dtype is not a key"):
        check_keys(builder, {"width": 1, "dtype": 2}, "model", given=("theory", "dtype"))

    def open_builder(theory, dtype, **keys):
        return keys

    check_keys(open_builder, {"anything": 1}, "model", given=("theory", "dtype"))


def test_the_old_words_keep_working_or_say_what_replaced_them():
    assert model_aliases(["model=small", "model=default", "model=u1_ncp", "model.n_bins=4"]) == \
        ["model_size=small", "model_size=default", "model=u1_ncp", "model.n_bins=4"]
    with pytest.raises(ValueError, match=r"^model.kind=affine is now the group choice model=affine"):
        model_aliases(["model.kind=affine"])
    # sample/score: the checkpoint's theory and model take keys the placeholder preset lacks
    assert checkpoint_overrides(["theory.m2=-3", "model.n_pairs=2", "sample.n=4", "+theory.x=1"]) == \
        ["++theory.m2=-3", "++model.n_pairs=2", "sample.n=4", "+theory.x=1"]


def test_older_checkpoint_nodes_build_the_same_flow():
    old_theory = {"name": "u1_2d", "kind": "gauge", "dim": 2, "group": "u1", "beta": 2.0, "action": "wilson",
                  "c1": None, "form": "standard", "m2": None, "lam": None, "kappa": None, "lam_tilde": None,
                  "default_shape": [8, 8], "default_batch_size": 256}
    new_theory = upgrade_theory(old_theory)
    assert new_theory["_target_"] == "gaugeflow.theories.gauge_theory" and "form" not in new_theory
    old_model = {"kind": None, "n_layers": 2, "hidden": [4], "kernel_size": 3, "activation": "leaky_relu",
                 "transform": "ncp", "n_bins": 8, "n_mix": 3, "bound": 4.0, "zero_init": False, "rectangles": True}
    a, b = build_theory(old_theory, [4, 4]), build_theory(new_theory, [4, 4])
    assert a.attributes() == b.attributes()
    new_model = upgrade_model(old_model, a)
    assert new_model["_target_"] == "gaugeflow.flows.models.u1_equivariant" and "bound" not in new_model
    torch.manual_seed(3)
    m1 = build_model(old_model | {"kind": "u1_equivariant"}, a, torch.float64)
    torch.manual_seed(3)
    m2 = build_model(new_model, b, torch.float64)
    x = a.start(3, "hot", torch.Generator().manual_seed(1))
    assert torch.equal(m1.log_prob(x), m2.log_prob(x))
    with pytest.raises(UsageError, match="model.kind='nope' is not an architecture"):
        upgrade_model({"kind": "nope"})
