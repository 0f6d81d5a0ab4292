"""Which modules an adapter goes on, with HF PEFT's rules, and the errors for bad input.

Everything goes through the public API, ``pj.inject`` + ``pj.targeted_modules``, on the
Llama-shaped tree of ``conftest.py`` (module paths ``model.layers.{0,1,2}.self_attn.q_proj``,
``model.layers.0.mlp.down_proj``, ``model.embed_tokens``, ``model.norm``, ``lm_head``...).
Every error test also checks that the input params are left unchanged.
"""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import peftjax as pj
from tests.conftest import (
    N_LAYERS,
    STACKED_LAYOUT,
    assert_unchanged,
    make_conv,
    make_dense_general,
    make_llama,
    make_stacked,
    snapshot,
    weight_nodes,
)

# RBG keys compile faster than threefry's; the init values play no part here.
KEY = jax.random.key(0, impl="unsafe_rbg")
LAYERS = range(N_LAYERS)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def attn(i, m):
    return f"model.layers.{i}.self_attn.{m}"


def mlp(i, m):
    return f"model.layers.{i}.mlp.{m}"


ALL_LINEAR = sorted(
    [attn(i, m) for i in LAYERS for m in ATTN] + [mlp(i, m) for i in LAYERS for m in MLP]
)


@pytest.fixture(scope="module")
def llama():
    return make_llama()


def targeted(params, config=None, layouts=None, **kw):
    config = config or pj.LoraConfig(r=2, **kw)
    return pj.targeted_modules(pj.inject(params, config, key=KEY, layouts=layouts))


# ------------------------------------------------------------------------------ selection rules


TARGET_CASES = {
    # a str is a regex that must match the whole module path
    "regex_fullmatch": (
        dict(target_modules=r"model\.layers\.[01]\.self_attn\.(q|v)_proj"),
        [attn(i, m) for i in (0, 1) for m in ("q_proj", "v_proj")],
    ),
    "regex_any_layer": (
        dict(target_modules=r".*\.(q|k)_proj"),
        sorted(attn(i, m) for i in LAYERS for m in ("k_proj", "q_proj")),
    ),
    # a list entry matches a whole path or a `.`-suffix (multi-segment suffixes work)
    "suffix_list": (
        dict(target_modules=["q_proj", "down_proj"]),
        sorted([attn(i, "q_proj") for i in LAYERS] + [mlp(i, "down_proj") for i in LAYERS]),
    ),
    "multi_segment_suffix": (
        dict(target_modules=["self_attn.o_proj", "layers.2.mlp.up_proj"]),
        sorted([attn(i, "o_proj") for i in LAYERS] + [mlp(2, "up_proj")]),
    ),
    "whole_path": (dict(target_modules=["model.layers.1.mlp.up_proj"]), [mlp(1, "up_proj")]),
    "top_level_module": (dict(target_modules=["lm_head"]), ["lm_head"]),
    "embedding_by_name": (dict(target_modules=["embed_tokens"]), ["model.embed_tokens"]),
    # "all-linear": every 2-D kernel but the output head; no embeddings, no norms
    "all_linear": (dict(target_modules="all-linear"), ALL_LINEAR),
    "all_linear_any_case": (dict(target_modules="ALL-LINEAR"), ALL_LINEAR),
    # exclude_modules: a list excludes names / `.`-suffixes, a str is a full-match regex
    "exclude_list": (
        dict(target_modules="all-linear", exclude_modules=["mlp.down_proj", "o_proj"]),
        sorted(p for p in ALL_LINEAR if not p.endswith(("down_proj", "o_proj"))),
    ),
    "exclude_regex": (
        dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.layers\.1\..*"),
        [attn(i, m) for i in (0, 2) for m in ("q_proj", "v_proj")],
    ),
    # layers_to_transform: the first index after a `<name>.` segment
    "layers_list": (
        dict(target_modules=["q_proj"], layers_to_transform=[0, 2]),
        [attn(0, "q_proj"), attn(2, "q_proj")],
    ),
    "layers_int": (dict(target_modules=["q_proj"], layers_to_transform=1), [attn(1, "q_proj")]),
    "layers_pattern": (
        dict(
            target_modules=["v_proj", "up_proj"], layers_to_transform=[2], layers_pattern="layers"
        ),
        [mlp(2, "up_proj"), attn(2, "v_proj")],
    ),
    "layers_pattern_list": (
        dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
        [attn(0, "v_proj")],
    ),
    # a whole-path entry matches at once, before (and so without) the layer filter
    "whole_path_skips_layer_filter": (
        dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[2]),
        [attn(0, "q_proj"), attn(2, "v_proj")],
    ),
    # an empty layers_to_transform means every layer (PEFT)
    "layers_empty_list": (
        dict(target_modules=["k_proj"], layers_to_transform=[]),
        [attn(i, "k_proj") for i in LAYERS],
    ),
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_target_selection(llama, case):
    kw, want = TARGET_CASES[case]
    snap = snapshot(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "excluded nothing" warning in these cases
        assert targeted(llama, **kw) == sorted(want)
    assert_unchanged(snap, llama)


def test_same_selection_for_every_method(llama):
    kw = dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 2])
    want = sorted([attn(1, "q_proj"), attn(2, "q_proj"), mlp(1, "down_proj"), mlp(2, "down_proj")])
    for cfg in (pj.LoraConfig(r=2, **kw), pj.LoHaConfig(r=2, **kw), pj.LoKrConfig(r=1, **kw)):
        assert targeted(llama, cfg) == want
    # IA3 and LN tuning have no layer filter
    assert targeted(llama, pj.IA3Config(target_modules=["q_proj"])) == [
        attn(i, "q_proj") for i in LAYERS
    ]
    assert targeted(llama, pj.LNTuningConfig(target_modules=["input_layernorm", "norm"])) == sorted(
        [f"model.layers.{i}.input_layernorm" for i in LAYERS] + ["model.norm"]
    )


def test_exclude_that_excludes_nothing_warns(llama):
    with pytest.warns(UserWarning, match="exclude_modules"):
        got = targeted(llama, target_modules=["q_proj"], exclude_modules=["nothing_here"])
    assert got == [attn(i, "q_proj") for i in LAYERS]
    # a str is a full-match regex: "v_proj" matches no whole path, so excludes nothing
    with pytest.warns(UserWarning, match="exclude_modules"):
        got = targeted(llama, target_modules=["v_proj"], exclude_modules="v_proj")
    assert got == [attn(i, "v_proj") for i in LAYERS]


def test_modules_to_save_not_adapted(llama):
    q = pj.inject(
        llama,
        pj.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]),
        key=KEY,
    )
    head = q["params"]["lm_head"]["kernel"]
    assert head.names == ("default",)
    assert head.spec("default").kind == "modules_to_save"  # a copy, not a LoRA
    assert pj.targeted_modules(q) == sorted(["lm_head"] + [attn(i, "q_proj") for i in LAYERS])


def test_stacked_layer_filter():
    p = make_stacked()
    cfg = pj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2, 7])
    mods = weight_nodes(pj.inject(p, cfg, key=KEY, layouts=STACKED_LAYOUT))
    assert sorted(mods) == ["layers.self_attn.q_proj", "layers.self_attn.v_proj"]
    for node in mods.values():
        assert node.spec("default").scaling == (4.0, 0.0, 4.0)  # alpha 8 / r 2
        assert node.spec("default").layers == (0, 2)  # layer 1 stores nothing
        assert node.arrays["default"]["lora_A"].shape[0] == 2


def test_all_linear_with_layouts():
    # stacked and DenseGeneral kernels read as dense by `layouts` are Linear layers too
    got = targeted(make_stacked(), target_modules="all-linear", layouts=STACKED_LAYOUT)
    assert got == ["layers.mlp.down_proj", "layers.self_attn.q_proj", "layers.self_attn.v_proj"]
    got = targeted(
        make_dense_general(),
        target_modules="all-linear",
        layouts={"query": pj.Layout("dense", n_in=1), "out": pj.Layout("dense", n_in=2)},
    )
    assert got == ["attn.out", "attn.query"]


def test_nnx_state_paths(nnx_state):
    snap = snapshot(nnx_state)
    assert targeted(nnx_state, target_modules=["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert targeted(nnx_state, target_modules="all-linear") == [
        "head",
        "layers.0.q_proj",
        "layers.0.v_proj",
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]
    # PEFT's default layer regex needs a segment before the layer list (`model.layers.1.`):
    # at the root, name the list with layers_pattern
    with pytest.raises(pj.TargetError, match="layers_to_transform"):
        targeted(nnx_state, target_modules=["v_proj"], layers_to_transform=[1])
    got = targeted(
        nnx_state, target_modules=["v_proj"], layers_to_transform=[1], layers_pattern="layers"
    )
    assert got == ["layers.1.v_proj"]
    assert targeted(nnx_state, pj.LNTuningConfig(target_modules=["norm"])) == [
        "layers.0.norm",
        "layers.1.norm",
    ]
    assert_unchanged(snap, nnx_state)


# ------------------------------------------------------------------------------ rank/alpha patterns


def test_rank_and_alpha_patterns(llama):
    cfg = pj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2, "model.layers.1.self_attn.v_proj": 8},
        alpha_pattern={"v_proj": 16},
    )
    mods = weight_nodes(pj.inject(llama, cfg, key=KEY))
    for i in LAYERS:
        q, v = mods[attn(i, "q_proj")].spec("default"), mods[attn(i, "v_proj")].spec("default")
        assert (q.r, q.scaling) == (2, (8 / 2,))
        want_r = 8 if i == 1 else 4
        assert (v.r, v.scaling) == (want_r, (16 / want_r,))
        assert mods[attn(i, "v_proj")].arrays["default"]["lora_A"].shape == (16, want_r)


def test_pattern_first_key_wins_and_rslora(llama):
    # both keys match layer 0's q_proj: the first in dict order wins (PEFT's rule)
    for order, want in (
        ({"layers.0.self_attn.q_proj": 3, "q_proj": 5}, 3),
        ({"q_proj": 5, "layers.0.self_attn.q_proj": 3}, 5),
    ):
        mods = weight_nodes(
            pj.inject(
                llama, pj.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern=order), key=KEY
            )
        )
        assert mods[attn(0, "q_proj")].spec("default").r == want
        assert mods[attn(1, "q_proj")].spec("default").r == 5
    # a key matches at a `.` boundary: "proj" is no suffix of "q_proj"
    cfg = pj.LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["k_proj"],
        rank_pattern={"k_proj": 16},
        alpha_pattern={"layers.2.self_attn.k_proj": 2},
    )
    mods = weight_nodes(pj.inject(llama, cfg, key=KEY))
    assert mods[attn(0, "k_proj")].spec("default").scaling == (8 / 16**0.5,)
    assert mods[attn(2, "k_proj")].spec("default").scaling == (2 / 16**0.5,)


def test_lycoris_patterns(llama):
    cfg = pj.LoHaConfig(
        r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2}
    )
    mods = weight_nodes(pj.inject(llama, cfg, key=KEY))
    assert mods[attn(1, "q_proj")].spec("default").r == 2
    assert mods[attn(1, "q_proj")].spec("default").scaling == (4.0,)
    assert mods[attn(0, "q_proj")].spec("default").scaling == (2.0,)
    assert mods[attn(1, "q_proj")].arrays["default"]["hada_w1_a"].shape == (2, 16)


# ------------------------------------------------------------------------------ errors


def expect_error(params, exc, match, fn):
    snap = snapshot(params)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert_unchanged(snap, params)
    return info.value


@pytest.mark.parametrize(
    "field,kw",
    [
        ("r", dict(r=0)),
        ("r", dict(r=-2)),
        ("rank_pattern", dict(rank_pattern={"q_proj": 0})),
    ],
)
def test_bad_rank(field, kw):
    with pytest.raises(pj.ConfigError, match=re.escape(f"`{field}")):
        pj.LoraConfig(target_modules=["q_proj"], **kw)
    with pytest.raises(ValueError, match=re.escape(f"`{field}")):  # ConfigError is a ValueError
        pj.LoHaConfig(target_modules=["q_proj"], **kw)


def test_target_matching_nothing(llama):
    for tm in (["nope"], r"nope", ["proj"], r"q_proj"):  # partial words / partial regex
        err = expect_error(
            llama,
            pj.TargetError,
            "target_modules",
            lambda tm=tm: pj.inject(llama, pj.LoraConfig(r=2, target_modules=tm), key=KEY),
        )
        assert "matched no module" in str(err)
    expect_error(
        llama,
        pj.TargetError,
        "layers_to_transform",
        lambda: pj.inject(
            llama, pj.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]), key=KEY
        ),
    )
    stacked = make_stacked()  # stacked weights are filtered per layer slice: 3 layers here
    expect_error(
        stacked,
        pj.TargetError,
        "layers_to_transform",
        lambda: pj.inject(
            stacked,
            pj.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]),
            key=KEY,
            layouts=STACKED_LAYOUT,
        ),
    )
    expect_error(
        llama,
        pj.TargetError,
        "layers_pattern",
        lambda: pj.inject(
            llama,
            pj.LoraConfig(
                target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="blocks"
            ),
            key=KEY,
        ),
    )
    expect_error(
        llama,
        pj.TargetError,
        "exclude_modules",
        lambda: pj.inject(
            llama, pj.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), key=KEY
        ),
    )
    expect_error(
        llama,
        pj.TargetError,
        "modules_to_save",
        lambda: pj.inject(
            llama, pj.LoraConfig(target_modules=["q_proj"], modules_to_save=["nothing"]), key=KEY
        ),
    )
    expect_error(
        llama,
        pj.ConfigError,
        "target_modules",
        lambda: pj.inject(llama, pj.LoraConfig(), key=KEY),  # None: no default table here
    )


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_nothing(llama, field):
    for key in ("k_proj", "zzz", "proj"):
        cfg = pj.LoraConfig(r=2, target_modules=["q_proj"], **{field: {key: 4}})
        err = expect_error(
            llama, pj.TargetError, field, lambda cfg=cfg: pj.inject(llama, cfg, key=KEY)
        )
        assert repr(key) in str(err)


def test_adapter_name_errors(llama):
    q = pj.inject(llama, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=KEY)
    expect_error(
        q,
        pj.AdapterNameError,
        "default",
        lambda: pj.inject(q, pj.LoraConfig(r=2, target_modules=["v_proj"]), key=KEY),
    )
    expect_error(q, pj.AdapterNameError, "nope", lambda: pj.delete(q, "nope"))
    expect_error(q, pj.AdapterNameError, "nope", lambda: pj.set_active(q, "nope"))
    expect_error(q, pj.AdapterNameError, "nope", lambda: pj.set_active(q, ["default", "nope"]))
    expect_error(q, pj.AdapterNameError, "nope", lambda: pj.merge(q, "nope"))
    # the same adapter twice would fold its delta in twice
    expect_error(q, pj.AdapterNameError, "twice", lambda: pj.merge(q, ["default", "default"]))
    expect_error(q, pj.AdapterNameError, "twice", lambda: pj.set_active(q, ["default"] * 2))
    expect_error(q, pj.AdapterNameError, "nope", lambda: pj.merge_and_unload(q, ["nope"]))
    expect_error(
        q,
        pj.AdapterNameError,
        "name",
        lambda: pj.inject(q, pj.LoraConfig(r=2, target_modules=["v_proj"]), key=KEY, name=""),
    )
    # AdapterNameError is a KeyError whose message reads normally
    err = expect_error(q, KeyError, "nope", lambda: pj.delete(q, "nope"))
    assert not str(err).startswith(("'", '"'))


def test_unmerge_with_nothing_merged(llama):
    q = pj.inject(llama, pj.LoraConfig(r=2, target_modules=["q_proj"]), key=KEY)
    expect_error(q, pj.MergeError, "unmerge", lambda: pj.unmerge(q))
    expect_error(llama, pj.MergeError, "unmerge", lambda: pj.unmerge(llama))
    m = pj.merge(q)
    pj.unmerge(m)  # fine once merged
    expect_error(m, pj.MergeError, "default", lambda: pj.delete(m, "default"))


@pytest.mark.parametrize(
    "config",
    [
        pj.LoHaConfig(r=2, target_modules=["embed_tokens"]),
        pj.LoKrConfig(r=2, target_modules=["embed_tokens"]),
        pj.IA3Config(target_modules=["embed_tokens"]),
    ],
    ids=["loha", "lokr", "ia3"],
)
def test_unsupported_module_kind(llama, config):
    err = expect_error(
        llama,
        pj.UnsupportedModuleError,
        r"model\.embed_tokens",
        lambda: pj.inject(llama, config, key=KEY),
    )
    msg = str(err)
    assert config.method in msg and "embed" in msg
    assert "dense" in msg and "conv" in msg  # the kinds it can adapt


def test_unsupported_conv1d_for_lokr():
    p = {"c": {"kernel": jnp.ones((3, 4, 8))}}  # a 1-D conv (k, in, out)
    err = expect_error(
        p,
        pj.UnsupportedModuleError,
        "`c`",
        lambda: pj.inject(
            p, pj.LoKrConfig(r=2, target_modules=["c"]), key=KEY, layouts=pj.Layout("conv")
        ),
    )
    assert "conv" in str(err)


@pytest.mark.parametrize(
    "make,target,shape",
    [
        (make_stacked, "q_proj", (3, 16, 16)),
        (make_dense_general, "query", (16, 2, 4)),
    ],
)
def test_ambiguous_3d_weight_needs_layouts(make, target, shape):
    p = make()
    err = expect_error(
        p,
        pj.UnsupportedModuleError,
        "layouts",
        lambda: pj.inject(p, pj.LoraConfig(r=2, target_modules=[target]), key=KEY),
    )
    assert target in str(err) and str(shape) in str(err)


def test_layout_that_does_not_fit():
    p = make_conv()
    expect_error(
        p,
        pj.UnsupportedModuleError,
        "conv1",
        lambda: pj.inject(
            p,
            pj.LoraConfig(r=2, target_modules=["conv1"]),
            key=KEY,
            layouts={"conv1": pj.Layout("embed")},
        ),
    )
    with pytest.raises(pj.UnsupportedModuleError, match="kind"):
        pj.Layout("attention")


def test_config_errors_name_the_field():
    with pytest.raises(pj.ConfigError, match="layers_to_transform"):
        pj.LoraConfig(target_modules="q_proj", layers_to_transform=[0])  # str target: PEFT too
    with pytest.raises(pj.ConfigError, match="layers_pattern"):
        pj.LoraConfig(target_modules=["q_proj"], layers_pattern="layers")
    with pytest.raises(pj.ConfigError, match="feedforward_modules"):
        pj.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(pj.ConfigError, match="init_lora_weights"):
        pj.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(pj.ConfigError, match="target_modules"):
        pj.LoraConfig(target_modules=[])


def test_two_copies_cannot_both_be_active(llama):
    q = pj.inject(llama, pj.LNTuningConfig(target_modules=["norm"]), key=KEY, name="a")
    q = pj.inject(q, pj.LNTuningConfig(target_modules=["norm"]), key=KEY, name="b")
    expect_error(q, pj.AdapterNameError, "model.norm", lambda: pj.set_active(q, ["a", "b"]))
