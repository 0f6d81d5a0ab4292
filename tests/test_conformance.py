"""Every registered method has rows in the shared case table, and the registry is coherent."""

from __future__ import annotations

import pytest

import peftjax as pj
from peftjax.methods import METHODS, config_from_dict, method_named
from tests.cases import CASES, PROMPT_CASES


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_has_cases(name):
    have = sorted({c.config.method for c in CASES + PROMPT_CASES})
    assert name in have, f"method {name!r} is registered but tests/cases.py has no case for it"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_registry_row(name):
    m = METHODS[name]
    assert m.name == name == m.config.method
    assert getattr(pj, m.config.__name__) is m.config  # exported by its PEFT name
    assert all(s.method == name for s in m.specs if isinstance(s.method, str))
    assert set(m.embed_suffixes) <= set(m.key_suffixes)
    assert set(m.adapts) <= {"dense", "conv", "embed"}
    assert m.whole_modules == (not m.adapts)
    for n, f in m.api.items():
        assert getattr(pj, n) is f
    # every case of the method round-trips through PEFT's dict form, by peft_type
    for c in (c for c in CASES + PROMPT_CASES if c.config.method == name):
        assert config_from_dict(c.config.to_dict()) == c.config


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(pj.ConfigError, match="registered methods are"):
        method_named("nope")
    with pytest.raises(pj.ConfigError, match="peft_type"):
        config_from_dict({"peft_type": "NOPE"})


def test_forward_handlers_are_keyed_by_primitive_objects():
    from jax.extend import core as jcore

    import peftjax.forward as pjf

    assert pjf._HANDLERS and all(isinstance(p, jcore.Primitive) for p in pjf._HANDLERS)
    # every primitive a jitted, remat'd, scanned LoRA forward binds at its top level is one the
    # interpreter handles or an ordinary one: a jit inside is inlined, not a stale name
    names = {p.name for p in pjf._HANDLERS}
    assert {"jit", "scan", "dot_general", "remat2", "conv_general_dilated", "gather"} <= names


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_states_its_mesh_rule_in_its_own_module(name):
    """`Spec.sharding_roles` (how the adapter's arrays follow a sharded base weight) is defined
    by each spec class with arrays, not inherited from the default (replicate everything)."""
    from peftjax.methods import DERIVED

    for cls in METHODS[name].specs:
        if getattr(cls, "role", None) == DERIVED:
            continue  # no arrays of its own
        owner = next(c for c in cls.__mro__ if "sharding_roles" in vars(c))
        assert owner.__name__ != "Spec", f"{cls.__name__} has no mesh rule (sharding_roles)"
