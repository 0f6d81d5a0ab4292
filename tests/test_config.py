"""Tests for peftjax.config: PEFT 0.21 defaults, hashability, validation, dict round trips."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from peftjax import IA3Config, LNTuningConfig, LoHaConfig, LoKrConfig, LoraConfig
from peftjax.config import AdapterConfig, FrozenDict
from peftjax.errors import ConfigError
from peftjax.methods import PEFT_TYPES, config_from_dict

# What PEFT 0.21.2 writes to adapter_config.json for a default config of each type (read from
# its source: the dataclass fields of `PeftConfig` and of each `tuners/<method>/config.py`).
_BASE = {
    "auto_mapping": None,
    "base_model_name_or_path": None,
    "inference_mode": False,
    "peft_version": "0.21.2",
    "revision": None,
    "task_type": None,
    "target_modules": None,
    "exclude_modules": None,
    "modules_to_save": None,
}
PEFT_DEFAULTS = {
    LoraConfig: {
        **_BASE,
        "peft_type": "LORA",
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "monteclora_config": None,
        "qalora_group_size": 16,
        "r": 8,
        "rank_pattern": {},
        "target_parameters": None,
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    },
    LoHaConfig: {
        **_BASE,
        "peft_type": "LOHA",
        "alpha": 8,
        "alpha_pattern": {},
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "r": 8,
        "rank_dropout": 0.0,
        "rank_pattern": {},
        "use_effective_conv2d": False,
    },
    LoKrConfig: {
        **_BASE,
        "peft_type": "LOKR",
        "alpha": 8,
        "alpha_pattern": {},
        "decompose_both": False,
        "decompose_factor": -1,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "module_dropout": 0.0,
        "r": 8,
        "rank_dropout": 0.0,
        "rank_dropout_scale": False,
        "rank_pattern": {},
        "use_effective_conv2d": False,
    },
    IA3Config: {
        **_BASE,
        "peft_type": "IA3",
        "fan_in_fan_out": False,
        "feedforward_modules": None,
        "init_ia3_weights": True,
    },
    LNTuningConfig: {**_BASE, "peft_type": "LN_TUNING"},
}
ALL = list(PEFT_DEFAULTS)

# One non-trivial, valid config per class.
EXAMPLES = [
    LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["v_proj", "q_proj"],
        exclude_modules="lm_head",
        use_rslora=True,
        use_dora=True,
        init_lora_weights="gaussian",
        layers_to_transform=[3, 1],
        layers_pattern="layers",
        rank_pattern={"v_proj": 16, "layers.0.q_proj": 2},
        alpha_pattern={"v_proj": 4.5},
        modules_to_save=["score"],
        task_type="CAUSAL_LM",
        base_model_name_or_path="some/model",
    ),
    LoHaConfig(
        r=2,
        alpha=4,
        rank_dropout=0.1,
        module_dropout=0.2,
        use_effective_conv2d=True,
        target_modules=r".*\.(q|v)_proj",
        init_weights=False,
        rank_pattern={"z": 3, "a": 5},
    ),
    LoKrConfig(
        r=4,
        alpha=8,
        decompose_both=True,
        decompose_factor=8,
        rank_dropout_scale=True,
        init_weights="lycoris",
        target_modules=["fc1"],
        layers_to_transform=0,
        alpha_pattern={"fc1": 2},
    ),
    IA3Config(
        target_modules=["k", "v", "wo"],
        feedforward_modules=["wo"],
        fan_in_fan_out=True,
        init_ia3_weights=False,
    ),
    LNTuningConfig(target_modules=["input_layernorm"], exclude_modules=["layers.0.norm"]),
]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_defaults_match_peft(cls):
    assert cls().to_dict() == PEFT_DEFAULTS[cls]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_class_attributes(cls):
    assert PEFT_TYPES[cls.peft_type] is cls
    assert cls.method == cls.peft_type.lower()
    assert set(cls.PEFT_IGNORED_FIELDS).isdisjoint(cls.PEFT_UNSUPPORTED_FIELDS)
    own = {f.name for f in dataclasses.fields(cls)}
    assert own.isdisjoint(cls.PEFT_IGNORED_FIELDS)
    assert own.isdisjoint(cls.PEFT_UNSUPPORTED_FIELDS)


def test_peft_types_and_abstract_base():
    from peftjax.methods import METHODS

    assert set(PEFT_TYPES) == {m.peft_type for m in METHODS.values()}
    assert {"LORA", "LOHA", "LOKR", "IA3", "LN_TUNING", "VERA", "ADALORA"} <= set(PEFT_TYPES)
    with pytest.raises(TypeError):
        AdapterConfig()


def test_keyword_only():
    with pytest.raises(TypeError):
        LoraConfig(8)  # type: ignore[misc]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: type(c).__name__)
def test_frozen(cfg):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.target_modules = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del cfg.exclude_modules
    if hasattr(cfg, "rank_pattern"):
        with pytest.raises(TypeError):
            cfg.rank_pattern["x"] = 1  # type: ignore[index]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: type(c).__name__)
def test_hashable_and_copyable(cfg):
    twin = type(cfg).from_dict(cfg.to_dict())
    assert twin == cfg and hash(twin) == hash(cfg)
    assert copy.deepcopy(cfg) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert dataclasses.replace(cfg) == cfg
    assert len({cfg, twin}) == 1


def test_jit_static_arg_traces_once():
    traces = []

    def f(cfg, x):
        traces.append(cfg)
        return x * cfg.scaling(cfg.r, cfg.lora_alpha)

    g = jax.jit(f, static_argnums=0)
    a = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"q": 2})
    b = LoraConfig(r=4, lora_alpha=8, target_modules=["v", "q"], rank_pattern={"q": 2})
    assert a is not b and a == b
    assert float(g(a, jnp.float32(1.0))) == 2.0
    assert float(g(b, jnp.float32(1.0))) == 2.0
    assert len(traces) == 1
    g(LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], rank_pattern={"v": 2}), 1.0)
    assert len(traces) == 2


@pytest.mark.parametrize("cfg", EXAMPLES, ids=lambda c: type(c).__name__)
def test_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert set(d) == set(PEFT_DEFAULTS[type(cfg)])
    text = json.dumps(d, indent=2, sort_keys=True)  # JSON-able: no tuples, sets or mappings
    assert json.loads(text) == d
    back = type(cfg).from_dict(d)
    assert back == cfg
    assert list(getattr(back, "rank_pattern", {})) == list(getattr(cfg, "rank_pattern", {}))
    assert config_from_dict(json.loads(json.dumps(d))) == cfg


def test_rank_pattern_order_kept_and_significant():
    a = LoraConfig(rank_pattern={"z": 1, "a": 2})
    b = LoraConfig(rank_pattern={"a": 2, "z": 1})
    assert list(a.rank_pattern) == ["z", "a"]
    assert list(a.to_dict()["rank_pattern"]) == ["z", "a"]
    assert a != b  # the first matching key wins, so order is part of the meaning
    assert isinstance(a.rank_pattern, FrozenDict) and isinstance(a.to_dict()["rank_pattern"], dict)
    # After PEFT's sort_keys=True dump, the order is alphabetical (as when PEFT reloads it).
    reread = LoraConfig.from_dict(json.loads(json.dumps(a.to_dict(), sort_keys=True)))
    assert list(reread.rank_pattern) == ["a", "z"]


def test_frozen_dict():
    m = FrozenDict({"b": 1, "a": 2})
    assert m == FrozenDict({"b": 1, "a": 2}) and hash(m) == hash(FrozenDict({"b": 1, "a": 2}))
    assert m != FrozenDict({"a": 2, "b": 1})
    assert m == {"b": 1, "a": 2} and m != {"a": 2, "b": 1}
    assert m != [("b", 1), ("a", 2)]
    assert dict(m) == {"a": 2, "b": 1} and len(m) == 2 and "a" in m and m.get("c") is None
    assert pickle.loads(pickle.dumps(m)) == m
    assert repr(FrozenDict()) == "FrozenDict({})"
    with pytest.raises(AttributeError):
        m.x = 1  # type: ignore[attr-defined]


def test_normalisation():
    c = LoraConfig(target_modules=["v", "q", "v"], exclude_modules=[], modules_to_save=[])
    assert c.target_modules == ("q", "v")
    assert c.exclude_modules is None and c.modules_to_save is None
    assert c.to_dict()["target_modules"] == ["q", "v"]
    assert LoraConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert LoraConfig(target_modules=("q",)) == LoraConfig(target_modules={"q"})
    assert LoraConfig(init_lora_weights="Gaussian").init_lora_weights == "gaussian"
    assert LoraConfig(target_modules=["q"], layers_to_transform=[2, 0, 2]).layers_to_transform == (
        0,
        2,
    )
    lay = LoraConfig(target_modules=["q"], layers_to_transform=4, layers_pattern=["h", "layers"])
    assert lay.layers_to_transform == 4 and lay.layers_pattern == ("h", "layers")
    assert lay.to_dict()["layers_to_transform"] == 4
    # An empty layers_to_transform means "every layer" in PEFT; the pattern is then moot.
    empty = LoraConfig(target_modules=["q"], layers_to_transform=[], layers_pattern="h")
    assert empty.layers_to_transform is None and empty.layers_pattern is None
    assert LoraConfig(layer_replication=[], target_parameters=[]).layer_replication is None
    assert LoraConfig(rank_pattern=None).rank_pattern == {}
    assert LoraConfig(modules_to_save=["b", "a"]).modules_to_save == ("b", "a")


def test_target_modules_none_is_allowed():
    for cls in ALL:
        assert cls().target_modules is None


def test_scaling():
    assert LoraConfig().scaling(4, 8) == 2.0
    assert LoraConfig(use_rslora=True).scaling(4, 8) == 4.0
    assert LoHaConfig().scaling(4, 2) == 0.5
    assert LoKrConfig().scaling(8, 8) == 1.0
    with pytest.raises(ConfigError, match="`r`"):
        LoraConfig().scaling(0, 8)


def test_ia3_feedforward_subset_rule():
    with pytest.raises(ConfigError, match="feedforward_modules.*missing \\['wi'\\]"):
        IA3Config(target_modules=["k", "v"], feedforward_modules=["wi"])
    # PEFT compares the names as a set; a suffix relation is not enough.
    with pytest.raises(ConfigError, match="feedforward_modules"):
        IA3Config(target_modules=["mlp.wo"], feedforward_modules=["wo"])
    # Checked only when both are lists.
    assert IA3Config(target_modules=".*wo", feedforward_modules=["wo"]).feedforward_modules == (
        "wo",
    )
    assert (
        IA3Config(target_modules=["wo"], feedforward_modules=".*wo").feedforward_modules == ".*wo"
    )
    assert IA3Config(feedforward_modules=["wo"]).target_modules is None
    assert IA3Config(target_modules=["wo"], feedforward_modules=[]).feedforward_modules is None


def test_lycoris_layers_with_regex_targets_accepted_like_peft():
    # Unlike LoraConfig, PEFT's LoHa/LoKr configs accept this (matching then ignores the layers).
    assert LoHaConfig(target_modules=".*q", layers_to_transform=1).layers_to_transform == 1
    assert LoKrConfig(target_modules=".*q", layers_to_transform=[1]).layers_to_transform == (1,)


INVALID = [
    (LoraConfig, {"r": 0}, "r"),
    (LoraConfig, {"r": -2}, "r"),
    (LoraConfig, {"r": 2.0}, "r"),
    (LoraConfig, {"r": True}, "r"),
    (LoraConfig, {"lora_alpha": "8"}, "lora_alpha"),
    (LoraConfig, {"lora_alpha": float("nan")}, "lora_alpha"),
    (LoraConfig, {"lora_dropout": -0.1}, "lora_dropout"),
    (LoraConfig, {"lora_dropout": 1.0}, "lora_dropout"),
    (LoraConfig, {"init_lora_weights": "kaiming"}, "init_lora_weights"),
    (LoraConfig, {"init_lora_weights": 1}, "init_lora_weights"),
    (LoraConfig, {"bias": "some"}, "bias"),
    (LoraConfig, {"use_dora": 1}, "use_dora"),
    (LoraConfig, {"use_rslora": "yes"}, "use_rslora"),
    (LoraConfig, {"fan_in_fan_out": None}, "fan_in_fan_out"),
    (LoraConfig, {"rank_pattern": {"q": 0}}, "rank_pattern"),
    (LoraConfig, {"rank_pattern": {"q": 2.5}}, "rank_pattern"),
    (LoraConfig, {"rank_pattern": [("q", 2)]}, "rank_pattern"),
    (LoraConfig, {"rank_pattern": {"": 2}}, "rank_pattern"),
    (LoraConfig, {"alpha_pattern": {"q": "x"}}, "alpha_pattern"),
    (LoraConfig, {"target_modules": []}, "target_modules"),
    (LoraConfig, {"target_modules": ""}, "target_modules"),
    (LoraConfig, {"target_modules": ["q", 3]}, "target_modules"),
    (LoraConfig, {"target_modules": 5}, "target_modules"),
    (LoraConfig, {"exclude_modules": [None]}, "exclude_modules"),
    (LoraConfig, {"modules_to_save": "lm_head"}, "modules_to_save"),
    (LoraConfig, {"layers_pattern": "layers"}, "layers_pattern"),
    (LoraConfig, {"target_modules": ".*q", "layers_to_transform": 0}, "layers_to_transform"),
    (LoraConfig, {"target_modules": ".*q", "layers_pattern": "h"}, "layers_pattern"),
    (
        LoraConfig,
        {"target_modules": ".*q", "layers_to_transform": [0], "layers_pattern": "h"},
        "layers_to_transform",
    ),
    (LoraConfig, {"layers_to_transform": -1}, "layers_to_transform"),
    (LoraConfig, {"layers_to_transform": ["0"]}, "layers_to_transform"),
    (LoraConfig, {"layers_to_transform": "0"}, "layers_to_transform"),
    (LoraConfig, {"task_type": "CHAT"}, "task_type"),
    (LoraConfig, {"task_type": ["CAUSAL_LM"]}, "task_type"),
    (LoraConfig, {"revision": 3}, "revision"),
    (LoraConfig, {"base_model_name_or_path": ["m"]}, "base_model_name_or_path"),
    (LoraConfig, {"inference_mode": "no"}, "inference_mode"),
    (LoHaConfig, {"r": 0}, "r"),
    (LoHaConfig, {"alpha": None}, "alpha"),
    (LoHaConfig, {"rank_dropout": 1.5}, "rank_dropout"),
    (LoHaConfig, {"module_dropout": -1e-3}, "module_dropout"),
    (LoHaConfig, {"init_weights": "lycoris"}, "init_weights"),
    (LoHaConfig, {"use_effective_conv2d": 0}, "use_effective_conv2d"),
    (LoHaConfig, {"rank_pattern": {"q": -1}}, "rank_pattern"),
    (LoHaConfig, {"layers_pattern": ["h"]}, "layers_pattern"),
    (LoHaConfig, {"target_modules": []}, "target_modules"),
    (LoKrConfig, {"r": 1.5}, "r"),
    (LoKrConfig, {"init_weights": "gaussian"}, "init_weights"),
    (LoKrConfig, {"decompose_factor": 2.0}, "decompose_factor"),
    (LoKrConfig, {"decompose_both": "true"}, "decompose_both"),
    (LoKrConfig, {"rank_dropout_scale": None}, "rank_dropout_scale"),
    (LoKrConfig, {"rank_dropout": 1}, "rank_dropout"),
    (IA3Config, {"init_ia3_weights": 1}, "init_ia3_weights"),
    (IA3Config, {"fan_in_fan_out": 0}, "fan_in_fan_out"),
    (IA3Config, {"target_modules": []}, "target_modules"),
    (IA3Config, {"feedforward_modules": 1}, "feedforward_modules"),
    (LNTuningConfig, {"target_modules": []}, "target_modules"),
    (LNTuningConfig, {"modules_to_save": "head"}, "modules_to_save"),
]


@pytest.mark.parametrize(
    "cls,kwargs,field", INVALID, ids=[f"{c.__name__}-{k}" for c, k, _ in INVALID]
)
def test_invalid_values_raise(cls, kwargs, field):
    names_field = f"`{field}(`|\\[)"  # `rank_pattern['q']` names the key as well
    with pytest.raises(ConfigError, match=names_field) as info:
        cls(**kwargs)
    assert isinstance(info.value, ValueError)
    # Every error also comes out of from_dict, i.e. when reading a file.
    with pytest.raises(ConfigError, match=names_field):
        cls.from_dict({"peft_type": cls.peft_type, **kwargs})


UNSUPPORTED_FIELDS = [
    ("bias", "all"),
    ("bias", "lora_only"),
    ("lora_bias", True),
    ("layer_replication", [[0, 4], [2, 5]]),
    ("trainable_token_indices", [0, 1]),
    ("trainable_token_indices", {"embed_tokens": [0]}),
] + [
    ("init_lora_weights", v)
    for v in (
        "pissa",
        "pissa_niter_4",
        "olora",
        "loftq",
        "eva",
        "corda",
        "orthogonal",
        "mica",
        "lora_ga",
        "OLoRA",
    )
]


@pytest.mark.parametrize("field,value", UNSUPPORTED_FIELDS, ids=lambda v: str(v))
def test_unsupported_lora_fields_raise(field, value):
    with pytest.raises(ConfigError, match=f"`{field}`") as info:
        LoraConfig(**{field: value})
    assert "not supported" in str(info.value)
    with pytest.raises(ConfigError, match=f"`{field}`"):
        LoraConfig.from_dict({"peft_type": "LORA", field: value})


UNSUPPORTED_KEYS = [
    ("use_qalora", True),
    ("alora_invocation_tokens", [1, 2, 3]),
    ("velora_config", {}),
    ("velora_config", {"num_groups": 8}),
    ("monteclora_config", {"num_samples": 4}),
    ("use_bdlora", {"nblocks": 2}),
    ("arrow_config", {"top_k": 2}),
    ("kasa_config", {"beta": 0.1}),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED_KEYS, ids=lambda v: str(v))
def test_unsupported_peft_keys_raise_in_from_dict(key, value):
    assert key in LoraConfig.PEFT_UNSUPPORTED_FIELDS
    with pytest.raises(ConfigError, match=f"`{key}`.*not supported"):
        LoraConfig.from_dict({"peft_type": "LORA", key: value})
    with pytest.raises(ConfigError, match=f"`{key}`"):
        config_from_dict({"peft_type": "LORA", key: value})
    # Their PEFT default is accepted (that is what every PEFT file holds).
    default = LoraConfig.PEFT_UNSUPPORTED_FIELDS[key]
    assert LoraConfig.from_dict({key: default}) == LoraConfig()


def test_harmless_and_unknown_keys_ignored():
    d = dict(PEFT_DEFAULTS[LoraConfig])
    d.update(
        r=16,
        peft_version="0.17.0@abc",
        megatron_core="my.megatron",
        megatron_config={"tensor_model_parallel_size": 2},
        qalora_group_size=32,
        loftq_config={"loftq_bits": 4},
        eva_config={"rho": 2.0},
        corda_config={"corda_method": "kpm"},
        lora_ga_config={"direction": "ArB2r"},
        ensure_weight_tying=True,
        auto_mapping={"base_model_class": "X"},
        runtime_config={"ephemeral_gpu_offload": True},
        some_future_field=[1, 2],
    )
    cfg = LoraConfig.from_dict(d)
    assert cfg == LoraConfig(r=16)
    assert cfg.to_dict()["megatron_core"] == "megatron.core"
    assert "runtime_config" not in cfg.to_dict() and "some_future_field" not in cfg.to_dict()
    assert LoHaConfig.from_dict({"alpha": 4, "use_dora": True, "peft_type": "loha"}).alpha == 4
    assert IA3Config.from_dict({"r": 0, "future": None}) == IA3Config()


def test_wrong_peft_type():
    with pytest.raises(ConfigError, match="`peft_type`='LOHA'"):
        LoraConfig.from_dict({"peft_type": "LOHA"})
    with pytest.raises(ConfigError, match="`peft_type`"):
        IA3Config.from_dict(LoraConfig().to_dict())
    with pytest.raises(ConfigError, match="IA3.*LN_TUNING.*LOHA.*LOKR.*LORA"):
        config_from_dict({"peft_type": "FOURIERFT", "r": 8})
    with pytest.raises(ConfigError, match="`peft_type`=None"):
        config_from_dict({"r": 8})
    with pytest.raises(ConfigError):
        config_from_dict([("peft_type", "LORA")])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LoraConfig.from_dict("LORA")  # type: ignore[arg-type]
    assert isinstance(config_from_dict({"peft_type": "ln_tuning"}), LNTuningConfig)
    assert isinstance(AdapterConfig.from_dict({"peft_type": "LoKr"}), LoKrConfig)
    assert LoraConfig.from_dict({"r": 2}).r == 2  # peft_type may be absent


_names = st.text("abcxyz_.", min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(
    r=st.integers(1, 64),
    alpha=st.one_of(st.integers(-8, 64), st.floats(-8, 64, allow_nan=False)),
    dropout=st.floats(0, 0.99),
    targets=st.one_of(st.just("all-linear"), st.lists(_names, min_size=1, max_size=4)),
    ranks=st.dictionaries(_names, st.integers(1, 32), max_size=4),
    alphas=st.dictionaries(_names, st.integers(1, 32), max_size=4),
    rslora=st.booleans(),
    dora=st.booleans(),
    init=st.sampled_from([True, False, "gaussian"]),
)
def test_lora_round_trip_property(r, alpha, dropout, targets, ranks, alphas, rslora, dora, init):
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        use_rslora=rslora,
        use_dora=dora,
        init_lora_weights=init,
    )
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and hash(back) == hash(cfg)
    assert list(back.rank_pattern) == list(ranks)
