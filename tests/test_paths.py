"""Tests of module paths and HF PEFT's module-matching rules (peftjax.paths)."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import peftjax as pj
from peftjax.errors import ConfigError, TargetError
from peftjax.paths import (
    check_pattern_keys,
    find_pattern_key,
    get_pattern_value,
    is_all_linear,
    is_excluded,
    is_in_modules_to_save,
    keypath_to_names,
    layer_index,
    leaf_name,
    matches_target,
    module_leaf_items,
    module_path,
    select_all_linear,
    select_modules,
    select_modules_to_save,
    suffix_match,
    validate_layer_options,
)

N_LAYERS = 4
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_keys(n_layers: int = N_LAYERS) -> list[str]:
    keys = ["model.embed_tokens"]
    for i in range(n_layers):
        keys += [f"model.layers.{i}.self_attn.{p}" for p in ATTN]
        keys += [f"model.layers.{i}.mlp.{p}" for p in MLP]
        keys += [f"model.layers.{i}.input_layernorm", f"model.layers.{i}.post_attention_layernorm"]
    return keys + ["model.norm", "lm_head"]


KEYS = llama_keys()


def layer_of(key: str) -> int:
    return int(key.split(".")[2])


def sel(**kw):
    return select_modules(KEYS, **kw)


# --------------------------------------------------------------------------- paths


def test_linen_params_paths():
    tree = {"params": {"model": {"layers": {"0": {"q_proj": {"kernel": jnp.ones((2, 3))}}}}}}
    [(kp, _)] = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = keypath_to_names(kp)
    assert names == ("params", "model", "layers", "0", "q_proj", "kernel")
    assert module_path(names) == "model.layers.0.q_proj"
    assert leaf_name(names) == "kernel"


def test_list_indices_and_plain_names():
    tree = {"model": {"layers": [{"w": {"kernel": jnp.ones(2)}}, ({"bias": jnp.ones(1)},)]}}
    got = [keypath_to_names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert got == [("model", "layers", "0", "w", "kernel"), ("model", "layers", "1", "0", "bias")]
    # one definition with `pj.inject`'s walk: a weight at the root is a module of its own, and a
    # 2-D array not named like a member leaf is a module of its own (plain trees)
    assert module_path(("params", "kernel")) == "kernel"
    assert module_path(("a", "params", "kernel")) == "a.params"  # only a leading collection
    assert module_path(("model", "q"), ndim=2) == "model.q"
    assert module_path(("model", "q"), ndim=1) == "model"
    p = pj.inject(
        {"model": {"q": jnp.ones((3, 3))}}, pj.LoraConfig(r=1, target_modules=["q"]), key=0
    )
    assert pj.targeted_modules(p) == [module_path(("model", "q"), ndim=2)]
    assert keypath_to_names(("layers", 3, "kernel")) == ("layers", "3", "kernel")


def test_flattened_index_key():
    kp = (jax.tree_util.DictKey("a"), jax.tree_util.FlattenedIndexKey(2))
    assert keypath_to_names(kp) == ("a", "2")


def test_nnx_state_paths():
    nnx = pytest.importorskip("flax.nnx")

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(4, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Block(rngs) for _ in range(2)])
            self.embed = nnx.Embed(8, 4, rngs=rngs)
            self.lm_head = nnx.Linear(4, 8, rngs=rngs)

    _, state = nnx.split(Model(nnx.Rngs(0)))
    items = module_leaf_items(state)
    paths = {(p, n) for p, n, _ in items}
    assert ("layers.0.q_proj", "kernel") in paths
    assert ("layers.1.norm", "scale") in paths
    assert ("embed", "embedding") in paths
    assert all(n not in ("value", "raw_value") for _, n, _ in items)
    # Variables kept whole (is_leaf) give the same names.
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    assert {keypath_to_names(kp) for kp, _ in flat} == {
        tuple(p.split(".")) + (n,) for p, n in paths
    }
    assert select_all_linear(items) == ["layers.0.q_proj", "layers.1.q_proj"]


# --------------------------------------------------------------------------- target_modules


def test_regex_is_full_match():
    assert sel(target_modules=r".*\.q_proj") == [
        f"model.layers.{i}.self_attn.q_proj" for i in range(4)
    ]
    assert sel(target_modules=r".*layers\.1\..*_proj") == [
        k for k in KEYS if ".layers.1." in k and k.endswith("_proj")
    ]
    # A regex matching only part of a path does not match.
    assert not matches_target("model.layers.0.self_attn.q_proj", "q_proj")
    assert not matches_target("model.layers.0.self_attn.q_proj", r"model\.layers")
    with pytest.raises(TargetError, match="target_modules"):
        sel(target_modules="q_proj")


def test_list_suffix_rules():
    assert sel(target_modules=["q_proj", "v_proj"]) == [
        k for k in KEYS if k.endswith((".q_proj", ".v_proj"))
    ]
    assert sel(target_modules=["self_attn.q_proj"]) == sel(target_modules=["q_proj"])
    assert sel(target_modules=["layers.2.mlp.up_proj"]) == ["model.layers.2.mlp.up_proj"]
    # No partial-word suffix in list mode.
    assert not matches_target("model.layers.0.self_attn.q_proj", ["proj"])
    assert not matches_target("model.layers.0.self_attn.q_proj", ["_proj"])
    with pytest.raises(TargetError, match=r"target_modules=\['proj'\]"):
        sel(target_modules=["proj"])
    # Tuples and sets behave like lists.
    assert sel(target_modules=("k_proj",)) == sel(target_modules={"k_proj"})


def test_exact_name_match():
    assert sel(target_modules=["lm_head"]) == ["lm_head"]
    assert sel(target_modules=["model.norm"]) == ["model.norm"]
    assert matches_target("lm_head", {"lm_head"})
    # "norm" as a suffix matches only model.norm (not the layernorms, no dot boundary).
    assert sel(target_modules=["norm"]) == ["model.norm"]


def test_exclude_modules():
    assert sel(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]) == sel(
        target_modules=["q_proj"]
    )
    got = sel(target_modules=["q_proj"], exclude_modules=r"model\.layers\.[01]\..*")
    assert got == ["model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    got = sel(target_modules=["q_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert "model.layers.0.self_attn.q_proj" not in got and len(got) == 3
    assert is_excluded("lm_head", ["lm_head"])
    assert not is_excluded("model.layers.0.self_attn.q_proj", ["proj"])  # dot boundary
    assert not is_excluded("model.layers.0.self_attn.q_proj", "q_proj")  # str: full match
    assert not is_excluded("x", None) and not is_excluded("x", [])


def test_exclude_everything_names_exclude_modules():
    with pytest.raises(TargetError, match="exclude_modules") as info:
        sel(target_modules=["q_proj"], exclude_modules=["q_proj"])
    assert "target_modules" in str(info.value)
    with pytest.raises(TargetError, match="exclude_modules"):
        sel(target_modules=r".*_proj", exclude_modules=r".*")


def test_unused_exclude_warns():
    with pytest.warns(UserWarning, match="exclude_modules"):
        sel(target_modules=["q_proj"], exclude_modules=["nothing_here"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel(target_modules=["q_proj"], exclude_modules=["v_proj"])


def test_modules_to_save_excluded_from_targets():
    got = sel(target_modules=r".*(q_proj|lm_head)", modules_to_save=["lm_head"])
    assert "lm_head" not in got and len(got) == 4
    # PEFT's rule: whole segments anywhere in the path, so "head" does not shield lm_head.
    assert not is_in_modules_to_save("lm_head", ["head"])
    assert is_in_modules_to_save("model.classifier.dense", ["classifier"])
    assert is_in_modules_to_save("lm_head", ["lm_head"])
    with pytest.raises(TargetError, match="modules_to_save"):
        sel(target_modules=["lm_head"], modules_to_save=["lm_head"])


def test_modules_to_save_suffix_rule():
    assert suffix_match("lm_head", ["head"])
    assert suffix_match("model.layers.0.mlp.down_proj", ["proj"])
    assert not suffix_match("lm_head", ["lm"])
    assert suffix_match("model.layers.0.mlp.down_proj", r".*mlp\.down_proj", "feedforward_modules")
    assert not suffix_match("model.layers.0.mlp.down_proj", "down_proj", "feedforward_modules")
    assert select_modules_to_save(KEYS, ["head"]) == ["lm_head"]
    # A head that holds only sub-modules is copied whole (outermost match).
    keys = ["roberta.encoder.dense", "classifier.dense", "classifier.out_proj"]
    assert select_modules_to_save(keys, ["classifier"]) == ["classifier"]
    assert select_modules_to_save(keys, ["dense"]) == ["roberta.encoder.dense", "classifier.dense"]
    with pytest.raises(TargetError, match="modules_to_save"):
        select_modules_to_save(KEYS, ["score"])


# --------------------------------------------------------------------------- layers


def test_layers_to_transform_int_and_list():
    assert sel(target_modules=["q_proj"], layers_to_transform=1) == [
        "model.layers.1.self_attn.q_proj"
    ]
    got = sel(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 3])
    assert got and {layer_of(k) for k in got} == {0, 3}
    got = sel(target_modules=["q_proj"], layers_to_transform=[2], layers_pattern="layers")
    assert got == ["model.layers.2.self_attn.q_proj"]
    got = sel(
        target_modules=["q_proj"], layers_to_transform=[2], layers_pattern=["blocks", "layers"]
    )
    assert got == ["model.layers.2.self_attn.q_proj"]
    # An empty list means no filter, as in PEFT.
    assert sel(target_modules=["q_proj"], layers_to_transform=[]) == sel(target_modules=["q_proj"])


def test_exact_name_skips_layer_filter():
    got = sel(target_modules=["lm_head", "q_proj"], layers_to_transform=[0])
    assert got == ["model.layers.0.self_attn.q_proj", "lm_head"]
    got = sel(target_modules=["model.layers.3.self_attn.q_proj", "k_proj"], layers_to_transform=0)
    assert got == ["model.layers.0.self_attn.k_proj", "model.layers.3.self_attn.q_proj"]


def test_first_layer_index_wins():
    moe = "model.layers.1.mlp.experts.0.up_proj"
    assert layer_index(moe) == 1
    assert layer_index(moe, "layers") == 1
    assert layer_index(moe, "experts") == 0
    keys = [f"model.layers.{i}.mlp.experts.{e}.up_proj" for i in range(3) for e in range(3)]
    got = select_modules(keys, target_modules=["up_proj"], layers_to_transform=[1])
    assert got == [f"model.layers.1.mlp.experts.{e}.up_proj" for e in range(3)]


def test_layer_index_needs_prefix_without_pattern():
    assert layer_index("model.layers.7.self_attn.q_proj") == 7
    # PEFT's default regex needs a segment before the list name: a root-level list has no index.
    assert layer_index("layers.7.self_attn.q_proj") is None
    assert layer_index("h.0.attn") is None
    assert layer_index("0.attn.q") is None
    assert layer_index("model.layers.7") is None  # no segment after the index
    # With layers_pattern the list may sit at the root.
    assert layer_index("layers.7.self_attn.q_proj", "layers") == 7
    assert layer_index("h.5.attn.c_attn", "h") == 5
    assert layer_index("model.mylayers.5.q", "layers") is None  # segment boundary
    # No index found -> no match, hence an error naming the layer fields.
    keys = ["encoder.q_proj", "decoder.q_proj"]
    with pytest.raises(TargetError, match="layers_to_transform"):
        select_modules(keys, target_modules=["q_proj"], layers_to_transform=0)


def test_layer_errors_name_fields():
    with pytest.raises(
        TargetError, match=r"layers_to_transform=\[9\].*layer indices found: \[0, 1, 2, 3\]"
    ):
        sel(target_modules=["q_proj"], layers_to_transform=[9])
    with pytest.raises(TargetError, match="layers_pattern"):
        sel(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks")


def test_layer_option_validation():
    with pytest.raises(ConfigError, match="layers_pattern.*layers_to_transform"):
        sel(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(ConfigError, match="layers_to_transform.*target_modules"):
        sel(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="layers_pattern.*target_modules"):
        validate_layer_options(".*", None, "layers")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        validate_layer_options(["q"], "0", None)
    # LoHa/LoKr only check layers_pattern without layers_to_transform; str target ignores layers.
    got = sel(target_modules=r".*q_proj", layers_to_transform=[0], forbid_with_str_target=False)
    assert len(got) == N_LAYERS
    with pytest.raises(ConfigError, match="layers_to_transform"):
        validate_layer_options(".*", None, "layers", forbid_with_str_target=False)


# --------------------------------------------------------------------------- all-linear


def test_all_linear():
    assert is_all_linear("all-linear") and is_all_linear("ALL-Linear")
    assert not is_all_linear(["all-linear"]) and not is_all_linear(".*")
    items = [(k, "kernel", 2) for k in KEYS if k.endswith("proj") or k == "lm_head"]
    items += [("model.embed_tokens", "embedding", 2), ("model.norm", "scale", 1)]
    items += [("model.conv", "kernel", 4), ("model.layers.0.self_attn.q_proj", "bias", 1)]
    linear = select_all_linear(items)
    assert "lm_head" not in linear and "model.conv" not in linear
    assert "model.embed_tokens" not in linear and "model.norm" not in linear
    assert len(linear) == N_LAYERS * 7
    got = sel(target_modules="all-linear", linear_modules=linear, exclude_modules=["o_proj"])
    assert len(got) == N_LAYERS * 6
    with pytest.raises(ConfigError, match="linear_modules"):
        sel(target_modules="all-linear")
    with pytest.raises(ConfigError, match="all-linear"):
        matches_target("lm_head", "all-linear")
    with pytest.raises(TargetError, match="all-linear"):
        sel(target_modules="all-linear", linear_modules=[])
    with pytest.raises(ConfigError, match="layers_to_transform"):
        sel(target_modules="all-linear", linear_modules=linear, layers_to_transform=[0])


def test_all_linear_seq_cls_head():
    items = [("bert.dense", "kernel", 2), ("classifier", "kernel", 2)]
    assert select_all_linear(items) == ["bert.dense", "classifier"]
    assert select_all_linear(items, task_type="SEQ_CLS") == ["bert.dense"]
    items.append(("lm_head", "kernel", 2))
    assert select_all_linear(items, task_type="SEQ_CLS") == ["bert.dense", "classifier"]


def test_module_leaf_items_linen():
    tree = {
        "params": {
            "lm_head": {"kernel": np.zeros((4, 8))},
            "model": {"embed_tokens": {"embedding": np.zeros((8, 4))}},
            "q": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)},
        }
    }
    items = module_leaf_items(tree)
    assert ("lm_head", "kernel", 2) in items and ("q", "kernel", 2) in items
    assert select_all_linear(items) == ["q"]


# --------------------------------------------------------------------------- rank/alpha patterns


def test_pattern_precedence_dict_order():
    q0 = "model.layers.0.self_attn.q_proj"
    q1 = "model.layers.1.self_attn.q_proj"
    first_generic = {"q_proj": 4, "layers.0.self_attn.q_proj": 16}
    first_specific = {"layers.0.self_attn.q_proj": 16, "q_proj": 4}
    assert get_pattern_value(q0, first_generic, 8) == 4
    assert get_pattern_value(q0, first_specific, 8) == 16
    assert get_pattern_value(q1, first_specific, 8) == 4
    assert get_pattern_value("model.layers.0.mlp.up_proj", first_specific, 8) == 8


def test_pattern_segment_boundary_and_regex():
    key = "model.layers.0.self_attn.q_proj"
    assert get_pattern_value(key, {"proj": 2}, 8) == 8  # no partial word
    assert get_pattern_value(key, {"self_attn.q_proj": 2}, 8) == 2
    assert get_pattern_value(key, {r"layers\.[0-1]\.self_attn\.q_proj": 2}, 8) == 2
    assert get_pattern_value(key, {r".*_proj": 2}, 8) == 2
    assert get_pattern_value(key, {key: 2}, 8) == 2
    assert get_pattern_value(key, {"^q_proj": 2}, 8) == 8  # anchored inside: never matches
    assert get_pattern_value(key, {"^model.layers.0.self_attn.q_proj": 2}, 8) == 2
    assert find_pattern_key(key, ["v_proj", "q_proj", "self_attn.q_proj"]) == "q_proj"
    assert find_pattern_key(key, []) is None


def test_check_pattern_keys():
    targeted = sel(target_modules=["q_proj", "v_proj"])
    check_pattern_keys(targeted, {"q_proj": 4, r"layers\.0\.self_attn\.v_proj": 2}, "rank_pattern")
    check_pattern_keys(targeted, {}, "rank_pattern")
    with pytest.raises(TargetError, match=r"alpha_pattern.*'k_proj'"):
        check_pattern_keys(targeted, {"q_proj": 4, "k_proj": 2}, "alpha_pattern")
    with pytest.raises(TargetError, match="rank_pattern"):
        check_pattern_keys(targeted, {"proj": 4}, "rank_pattern")
    with pytest.raises(ConfigError, match="rank_pattern"):
        check_pattern_keys(targeted, {"q_proj(": 4}, "rank_pattern")


# --------------------------------------------------------------------------- errors


def test_errors_name_fields_and_show_paths():
    with pytest.raises(TargetError) as info:
        sel(target_modules=["foo"])
    msg = str(info.value)
    assert "`target_modules=['foo']` matched no module" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and msg.endswith(", ...")
    for empty in (None, [], set()):
        with pytest.raises(TargetError, match="target_modules"):
            sel(target_modules=empty)
    with pytest.raises(TargetError, match="target_modules"):
        select_modules([], target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="target_modules"):
        sel(target_modules="q_proj(")
    with pytest.raises(ConfigError, match="exclude_modules"):
        sel(target_modules=["q_proj"], exclude_modules=[1])
    with pytest.raises(ConfigError, match="target_modules"):
        sel(target_modules=[None])
    assert isinstance(TargetError("x"), ValueError)


# --------------------------------------------------------------------------- properties

segment = st.sampled_from(["model", "layers", "0", "1", "2", "mlp", "q_proj", "up_proj", "norm"])
path = st.lists(segment, min_size=1, max_size=6).map(".".join)
names = st.lists(st.sampled_from(["q_proj", "up_proj", "norm", "mlp.up_proj", "0"]), max_size=3)


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(path, min_size=1, max_size=12),
    targets=st.lists(st.sampled_from(["q_proj", "up_proj", "norm", "mlp.up_proj"]), min_size=1),
    exclude=names,
    layers=st.none() | st.integers(0, 2) | st.lists(st.integers(0, 2), max_size=2),
)
def test_selection_is_subset_and_respects_exclusions(keys, targets, exclude, layers):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = select_modules(
                keys, target_modules=targets, exclude_modules=exclude, layers_to_transform=layers
            )
    except TargetError:
        got = []
        expected = [
            k
            for k in keys
            if not is_excluded(k, exclude)
            and matches_target(k, targets, layers_to_transform=layers)
        ]
        assert expected == []
    assert set(got) <= set(keys)
    assert len(got) == len(set(got))
    for k in got:
        assert not is_excluded(k, exclude)
        assert k in targets or any(k.endswith("." + t) for t in targets)


@settings(max_examples=150, deadline=None)
@given(
    key=path,
    pattern=st.dictionaries(
        st.sampled_from(["q_proj", "0.q_proj", "norm", "up_proj"]), st.integers(1, 64), max_size=4
    ),
)
def test_pattern_value_matches_reference_rule(key, pattern):
    expected = 8
    for k, v in pattern.items():
        if re.match(rf"(.*\.)?({k})$", key):
            expected = v
            break
    assert get_pattern_value(key, pattern, 8) == expected
    # A listed key matches exactly the paths equal to it or ending in "." + it.
    for k in pattern:
        assert bool(find_pattern_key(key, [k])) == (key == k or key.endswith("." + k))
