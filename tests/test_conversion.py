"""LoRA on PEFT's ``target_parameters`` (MoE expert weights), injection from a state dict's
keys, and PEFT 0.19+'s conversion of additive adapters to LoRA, against NumPy references and
fixtures made by real HF PEFT 0.21.2 (``tests/fixtures/make_peft_fixtures_conversion.py``; no
torch here). PEFT loading what peftjax writes was checked with that script's ``--check``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from peftjax import io as pio
from tests.conftest import assert_unchanged, randomize, snapshot
from tests.test_io import flax_from_torch

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
TP = FIX / "lora_target_parameters"
E, D, H = 3, 6, 4  # experts, model width, expert width (the fixture's MoE)
TPARAMS = ["experts.gate_up_proj", "mlp.experts.down_proj", "router.weight"]


def nodes_by_module(tree) -> dict[str, pj.Adapted]:
    leaves = pio.walk(tree)[0]
    return {l.module: l.value for l in leaves if isinstance(l.value, pj.Adapted)}


# ------------------------------------------------------------------------ target_parameters


def moe_params(sd: dict) -> dict:
    """The fixture's torch MoE as a Flax tree: expert weights ``(E, in, out)``."""
    ex = "mlp.experts."
    return {
        "router": {"kernel": jnp.asarray(sd["router.weight"].T)},
        "mlp": {
            "experts": {
                n: jnp.asarray(sd[ex + n].transpose(0, 2, 1)) for n in ("gate_up_proj", "down_proj")
            }
        },
        "lin": {"kernel": jnp.asarray(sd["lin.weight"].T), "bias": jnp.asarray(sd["lin.bias"])},
    }


def moe(p, x):
    """The fixture's forward, einsums over the ``(E, in, out)`` expert kernels."""
    w = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)
    gu = jnp.einsum("td,edo->eto", x, p["mlp"]["experts"]["gate_up_proj"])
    h = jax.nn.silu(gu[..., :H]) * gu[..., H:]
    y = jnp.einsum("eth,ehd->etd", h, p["mlp"]["experts"]["down_proj"])
    return jnp.einsum("te,etd->td", w, y) @ p["lin"]["kernel"] + p["lin"]["bias"]


MOE = jax.jit(pj.apply(moe))  # one compiled forward, shared by the tests below


@pytest.fixture(scope="module")
def tp():
    base = moe_params(load_file(str(TP / "base.safetensors")))
    return base, load_file(str(TP / "io.safetensors")), pj.load_pretrained(base, TP)


def test_target_parameters_config():
    cfg = pj.LoraConfig(target_modules=[], target_parameters=["experts.w", "experts.w", "x.v"])
    assert cfg.target_modules == () and cfg.target_parameters == ("experts.w", "x.v")
    d = cfg.to_dict()
    assert d["target_modules"] == [] and d["target_parameters"] == ["experts.w", "x.v"]
    assert pj.LoraConfig.from_dict(d) == cfg
    assert pj.LoraConfig(target_parameters=[]).target_parameters is None
    for kw, field in [
        (dict(target_parameters="experts.w"), "target_parameters"),
        (dict(target_parameters=["a..b"]), "target_parameters"),
        (dict(target_parameters=["e.w"], lora_dropout=0.1), "lora_dropout"),
        (dict(target_parameters=["e.w"], use_dora=True), "use_dora"),
    ]:
        with pytest.raises(pj.ConfigError, match=field):
            pj.LoraConfig(target_modules=["q"], **kw)
    with pytest.raises(pj.ConfigError, match="target_modules"):
        pj.LoraConfig(target_modules=[])  # no parameters either: targets nothing


def test_target_parameters_load_apply_merge_match_peft(tp):
    base, io, q = tp
    by = nodes_by_module(q)
    gate, down = by["mlp.experts.gate_up_proj"], by["mlp.experts.down_proj"]
    assert gate.spec("default").nest == 1 and down.spec("default").nest == 0  # PEFT's nesting
    assert gate.arrays["default"]["lora_A"].shape == (E, D, 2)
    assert down.spec("default").r == 3  # rank_pattern {"down_proj": 3} on the parameter path
    assert down.spec("default").scaling == (4 / 3,) * E
    n_file = sum(v.size for v in load_file(str(TP / pio.WEIGHTS_NAME)).values())
    assert pj.count_parameters(q)[0] == n_file  # PEFT's parameter count
    x = jnp.asarray(io["x"])
    np.testing.assert_allclose(moe(base, x), io["y_base"], atol=1e-6)
    np.testing.assert_allclose(MOE(q, x), io["y_adapted"], atol=2e-6)
    m = pj.merge_and_unload(q)
    for n in ("gate_up_proj", "down_proj"):
        want = io[f"merged.mlp.experts.{n}"].transpose(0, 2, 1)
        np.testing.assert_allclose(m["mlp"]["experts"][n], want, atol=2e-6)
    np.testing.assert_allclose(m["router"]["kernel"], io["merged.router.weight"].T, atol=2e-6)
    back = pj.unmerge(pj.merge(q))
    for n in ("gate_up_proj", "down_proj"):
        np.testing.assert_allclose(
            back["mlp"]["experts"][n].base, base["mlp"]["experts"][n], atol=2e-6
        )


def test_target_parameters_save_back_bit_identical(tp, tmp_path):
    base, _, q = tp
    out = pj.save_pretrained(q, tmp_path / "a")
    want, got = load_file(str(TP / pio.WEIGHTS_NAME)), load_file(str(out / pio.WEIGHTS_NAME))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    cfg = json.loads((out / pio.CONFIG_NAME).read_text())
    assert cfg["target_modules"] == ["lin"]
    # exact paths, innermost wrapper of each module first (so a re-injection nests the same)
    assert cfg["target_parameters"] == [
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
        "router.weight",
    ]
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (
        2,
        4,
        {"mlp.experts.down_proj": 3},
    )
    again = pj.load_pretrained(base, out)
    for mod, node in nodes_by_module(again).items():
        old = nodes_by_module(q)[mod]
        assert node.spec("default") == old.spec("default"), mod
    # a given config is checked against the parameters too
    pj.save_pretrained(q, tmp_path / "b", config=pio.read_adapter(TP)[0])
    bad = pj.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], target_parameters=["x.y"])
    with pytest.raises(pj.ConfigError, match="does not target parameter `mlp.experts"):
        pj.save_pretrained(q, tmp_path / "c", config=bad)


def test_target_parameters_nesting_read_from_the_file_shapes(tp, tmp_path):
    """PEFT nests in the torch module's parameter order, whatever order the config lists: a
    config listing ``down_proj`` first still loads, the nesting read from the shapes."""
    base, io, q = tp
    d = tmp_path / "reordered"
    d.mkdir()
    (d / pio.WEIGHTS_NAME).write_bytes((TP / pio.WEIGHTS_NAME).read_bytes())
    cfg = json.loads((TP / pio.CONFIG_NAME).read_text())
    cfg["target_parameters"] = ["mlp.experts.down_proj", "experts.gate_up_proj", "router.weight"]
    (d / pio.CONFIG_NAME).write_text(json.dumps(cfg))
    r = pj.load_pretrained(base, d)
    assert nodes_by_module(r)["mlp.experts.gate_up_proj"].spec("default").nest == 1
    np.testing.assert_allclose(MOE(r, io["x"]), io["y_adapted"], atol=2e-6)
    # injecting with that config nests in its order instead (down_proj innermost)
    fresh = pj.inject(base, pio.read_adapter(d)[0], key=0)
    assert nodes_by_module(fresh)["mlp.experts.down_proj"].spec("default").nest == 1


def _expert_delta(arrays, scale):
    a, b = (np.asarray(arrays[k], np.float64) for k in ("lora_A", "lora_B"))
    return scale * np.einsum("eir,ero->eio", a, b)


def test_target_parameters_inject_merge_apply_numpy():
    rng = np.random.default_rng(0)
    base = {
        "blk": {
            "experts": {"w": jnp.asarray(rng.normal(size=(E, 5, 7)), jnp.float32)},
            "dense": {"kernel": jnp.asarray(rng.normal(size=(5, 5)), jnp.float32)},
        }
    }
    snap = snapshot(base)
    # a `w` leaf is torch's `weight` (as `kernel`): the parameter path is `blk.experts.weight`
    cfg = pj.LoraConfig(
        r=2, lora_alpha=6, target_modules=["dense"], target_parameters=["experts.weight"]
    )
    q = randomize(pj.inject(base, cfg, key=1))
    assert_unchanged(snap, base)
    node = q["blk"]["experts"]["w"]
    spec = node.spec("default")
    assert spec.target_parameter == "blk.experts.weight" and spec.layout == pj.Layout(
        "dense", stack=1
    )
    want = np.asarray(base["blk"]["experts"]["w"], np.float64) + _expert_delta(
        node.arrays["default"], 3.0
    )
    merged = pj.merge_and_unload(q)
    np.testing.assert_allclose(merged["blk"]["experts"]["w"], want, rtol=1e-5, atol=1e-5)
    unm = pj.unmerge(pj.merge(q))["blk"]["experts"]["w"].base
    np.testing.assert_allclose(unm, base["blk"]["experts"]["w"], atol=1e-5)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)

    def f(p, x):  # every expert, and a per-token expert choice (a gather of the stacked kernel)
        w = p["blk"]["experts"]["w"]
        return jnp.einsum("ti,eio->teo", x, w), jnp.einsum("ti,tio->to", x, w[jnp.arange(4) % E])

    got, want_out = jax.jit(pj.apply(f))(q, x), f(merged, x)
    for g, w in zip(got, want_out, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # trains: gradients reach the expert factors only
    trainable, frozen = pj.partition(q)
    loss = lambda t: jnp.sum(pj.apply(f)(pj.combine(t, frozen), x)[0] ** 2)
    g = jax.jit(jax.grad(loss))(trainable)
    assert float(jnp.abs(g["blk"]["experts"]["w"].arrays["default"]["lora_A"]).sum()) > 0


def test_target_parameters_transposed_kernels_write_the_same_file(tp, tmp_path):
    base, io, q = tp
    flipped = jax.tree_util.tree_map(lambda a: a, base)
    for n in ("gate_up_proj", "down_proj"):  # (E, out, in) kernels: x @ W[e].T
        flipped["mlp"]["experts"][n] = base["mlp"]["experts"][n].transpose(0, 2, 1)
    lay = {n: pj.Layout("dense", stack=1, transposed=True) for n in ("gate_up_proj", "down_proj")}
    qt = pj.load_pretrained(flipped, TP, layouts=lay)
    out = pj.save_pretrained(qt, tmp_path / "t")
    want, got = load_file(str(TP / pio.WEIGHTS_NAME)), load_file(str(out / pio.WEIGHTS_NAME))
    assert all(np.array_equal(got[k], want[k]) for k in want)
    m = pj.merge_and_unload(qt)["mlp"]["experts"]["down_proj"]
    np.testing.assert_allclose(m, io["merged.mlp.experts.down_proj"], atol=2e-6)


def test_target_parameters_errors(tp, tmp_path):
    base, _, q = tp
    cfg = lambda **kw: pj.LoraConfig(**{"target_modules": [], **kw})
    with pytest.raises(pj.TargetError, match="matched no parameter"):
        pj.inject(base, cfg(target_parameters=["nope"]), key=0)
    with pytest.raises(pj.TargetError, match="also targeted by `target_modules`"):
        pj.inject(base, cfg(target_modules=["router"], target_parameters=["router.weight"]), key=0)
    with pytest.raises(pj.UnsupportedModuleError, match="`blk.w4` has shape"):
        pj.inject({"blk": {"w4": jnp.ones((2, 2, 2, 2))}}, cfg(target_parameters=["w4"]), key=0)
    with pytest.raises(pj.UnsupportedModuleError, match="top level"):
        pj.inject({"experts_w": jnp.ones((2, 3, 4))}, cfg(target_parameters=["experts_w"]), key=0)
    with pytest.warns(RuntimeWarning, match="no module was matched"):
        pj.inject(base, cfg(target_modules=["nope"], target_parameters=["router.weight"]), key=0)
    # a file that lacks a targeted parameter's weights
    d = tmp_path / "partial"
    d.mkdir()
    t = load_file(str(TP / pio.WEIGHTS_NAME))
    t = {k: v for k, v in t.items() if ".experts.lora_" not in k}  # drop down_proj's
    pio.write_safetensors(d / pio.WEIGHTS_NAME, t, {"format": "pt"})
    (d / pio.CONFIG_NAME).write_text((TP / pio.CONFIG_NAME).read_text())
    with pytest.raises(pj.FormatError, match=r"mlp\.experts\.down_proj"):
        pj.load_pretrained(base, d)
    loaded = pj.load_pretrained(base, d, strict=False)
    b = nodes_by_module(loaded)["mlp.experts.down_proj"].arrays["default"]["lora_B"]
    assert not np.any(np.asarray(b))  # inject's zero init for the missing one


# ------------------------------------------------------------------------ from a state dict

MLP_BASE = {
    "fc1": {"kernel": jnp.ones((12, 20)), "bias": jnp.zeros(20)},
    "fc2": {"kernel": jnp.ones((20, 12)), "bias": jnp.zeros(12)},
}


@pytest.fixture(scope="module")
def injected():
    return json.loads((FIX / "inject_state_dict" / "injected.json").read_text())


def _sd(injected, prefix=""):
    return {prefix + k: np.zeros(s, np.float32) for k, s in injected["state_dict_shapes"].items()}


def test_inject_from_state_dict_matches_peft(injected):
    c = injected["config"]
    cfg = pj.LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], target_modules=c["target_modules"])
    snap = snapshot(MLP_BASE)
    keys_only = {k: None for k in injected["state_dict_keys"]}  # PEFT uses only the keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = pj.inject_from_state_dict(MLP_BASE, cfg, keys_only, key=0)
    assert_unchanged(snap, MLP_BASE)
    assert pj.targeted_modules(q) == injected["injected_modules"] == ["fc1", "fc2"]
    got = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert got == injected["warnings"]  # PEFT's own text
    t = pio.walk(q)
    saved = {}
    for l in t[0]:
        if isinstance(l.value, pj.Adapted):
            for arr, (suffix, rule) in l.value.spec("default").file_rules().items():
                shape = rule.torch_shape(tuple(l.value.arrays["default"][arr].shape))
                saved[f"{l.module}.{suffix.replace('.weight', '.default.weight')}"] = list(shape)
    assert saved == injected["injected_shapes"]  # ranks from the config (r=4), as PEFT
    # the shapes of the state dict's tensors (r=2) disagree with that: named, with the rank
    with pytest.raises(pj.ShapeError, match=r"`fc1.lora_A.weight`.*rank 2"):
        pj.inject_from_state_dict(MLP_BASE, cfg, _sd(injected), key=0)


def test_inject_from_state_dict_ranks_and_key_forms(injected):
    cfg = pj.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], rank_pattern={"fc2": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q = pj.inject_from_state_dict(MLP_BASE, cfg, _sd(injected), key=0, ranks="state_dict")
        specs = {m: n.spec("default") for m, n in nodes_by_module(q).items()}
        assert {m: (s.r, s.scaling) for m, s in specs.items()} == {
            "fc1": (2, (4.0,)),  # the state dict's rank, the config's alpha
            "fc2": (2, (4.0,)),
        }
        forms = [  # PEFT's checkpoint keys, with or without the prefix; the model's own keys
            _sd(injected, "base_model.model."),
            _sd(injected, "_orig_mod."),
            {k.replace(".weight", ".default.weight"): v for k, v in _sd(injected).items()},
        ]
        r2 = pj.LoraConfig(r=2, target_modules=["fc1", "fc2"])
        for sd in forms:
            q2 = pj.inject_from_state_dict(MLP_BASE, r2, sd, key=0)
            assert pj.targeted_modules(q2) == ["fc1", "fc2"]
        # a LoHa state dict (PEFT's file) with a LoHa config of another rank
        loha = load_file(str(FIX / "loha_linear" / pio.WEIGHTS_NAME))
        base = flax_from_torch(load_file(str(FIX / "loha_linear" / "base.safetensors")))
        q = pj.inject_from_state_dict(
            base, pj.LoHaConfig(r=8, alpha=8, target_modules=["x"]), loha, key=0, ranks="state_dict"
        )
    assert {m: n.spec("default").r for m, n in nodes_by_module(q).items()} == {"fc1": 4, "fc2": 4}


def test_inject_from_state_dict_stacked_layers_and_copies(tmp_path):
    st = {
        "model": {"layers": {"q": {"kernel": jnp.ones((3, 8, 8))}}},
        "head": {"kernel": jnp.ones((8, 2))},
    }
    sd = {}
    for i in (0, 2):
        sd[f"model.layers.{i}.q.lora_A.weight"] = np.zeros((2, 8))
        sd[f"model.layers.{i}.q.lora_B.weight"] = np.zeros((8, 2))
    sd["head.weight"] = np.zeros((2, 8))  # a modules_to_save copy: not a target
    cfg = pj.LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"])
    q = pj.inject_from_state_dict(st, cfg, sd, key=0, layouts={"q": pj.Layout("dense", stack=1)})
    node = q["model"]["layers"]["q"]["kernel"]
    spec = node.spec("default")
    assert spec.layers == (0, 2) and spec.scaling == (4.0, 0.0, 4.0)
    assert node.arrays["default"]["lora_A"].shape == (2, 8, 2)
    assert isinstance(q["head"]["kernel"], pj.Adapted)  # the config's modules_to_save
    keys = sorted(load_file(str(pj.save_pretrained(q, tmp_path) / pio.WEIGHTS_NAME)))
    assert keys == sorted(f"base_model.model.{k}" for k in sd)


def test_inject_from_state_dict_refuses(injected):
    cfg = pj.LoraConfig(r=2, target_modules=["fc1"])
    sd = _sd(injected)
    cases = [
        (dict(state_dict={"fc1.hada_w1_a": np.zeros((20, 2))}), pj.ConfigError, "loha adapter key"),
        (dict(state_dict={**sd, "nope.lora_A.weight": 0}), pj.TargetError, "nope.lora_A"),
        (dict(state_dict={"fc1.weight": 0}), pj.TargetError, "holds no LORA adapter keys"),
        (dict(state_dict=[1]), pj.ArgumentTypeError, "mapping"),
        (dict(state_dict=sd, ranks="shape"), pj.ArgumentTypeError, "ranks"),
        (
            dict(state_dict={**sd, "fc1.lora_magnitude_vector": np.ones(20)}),
            pj.ConfigError,
            "lora_magnitude_vector",
        ),
        (
            dict(state_dict=sd, config=pj.LoraConfig(target_modules=[], target_parameters=["w"])),
            pj.ConfigError,
            "target_parameters",
        ),
    ]
    for kw, err, match in cases:
        args = {"config": cfg, **kw}
        with pytest.raises(err, match=match):
            pj.inject_from_state_dict(
                MLP_BASE,
                args["config"],
                args["state_dict"],
                key=0,
                **{k: v for k, v in kw.items() if k == "ranks"},
            )
    q = pj.inject_from_state_dict(
        MLP_BASE, cfg, {**sd, "nope.lora_A.weight": 0}, key=0, strict=False
    )
    assert pj.targeted_modules(q) == ["fc1", "fc2"]


# ------------------------------------------------------------------------ conversion to LoRA


def _mlp(p, x):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


@pytest.fixture(scope="module", params=["convert_loha_rank3", "convert_lokr_threshold"])
def conv_case(request):
    d = FIX / request.param
    base = flax_from_torch(load_file(str(d / "base.safetensors")))
    rank = 3 if request.param.endswith("rank3") else 0.9
    return d, base, pj.load_pretrained(base, d), rank


def test_convert_to_lora_matches_peft(conv_case, tmp_path):
    d, base, q, rank = conv_case
    assert pj.supports_lora_conversion(q)
    snap = snapshot(q)
    lo = pj.convert_to_lora(q, rank)
    assert_unchanged(snap, q)
    peft = load_file(str(d / "lora" / pio.WEIGHTS_NAME))
    for mod in ("fc1", "fc2"):
        node = lo[mod]["kernel"]
        a, b = (np.asarray(node.arrays["default"][k], np.float64) for k in ("lora_A", "lora_B"))
        pa = peft[f"base_model.model.{mod}.lora_A.weight"].astype(np.float64)
        pb = peft[f"base_model.model.{mod}.lora_B.weight"].astype(np.float64)
        assert a.shape == pa.T.shape and node.spec("default").scaling == (1.0,)
        np.testing.assert_allclose(a @ b, (pb @ pa).T, atol=2e-6)
        # the same singular vectors (up to sign); the singular values are in B
        sign = np.sign(np.sum(a * pa.T, axis=0))
        np.testing.assert_allclose(a * sign, pa.T, atol=2e-6)
        np.testing.assert_allclose(b * sign[:, None], pb.T, atol=2e-6)
    io = load_file(str(d / "io.safetensors"))
    np.testing.assert_allclose(pj.apply(_mlp)(lo, io["x"]), io["y_lora"], atol=2e-6)
    out = pj.save_as_lora(q, tmp_path / "lora", rank)
    ours, theirs = pio.read_adapter(out)[0], pio.read_adapter(d / "lora")[0]
    for mod in ("fc1", "fc2"):  # the same rank and scaling per module as PEFT's config
        r, alpha = ours.rank_alpha(mod)
        pr, palpha = theirs.rank_alpha(mod)
        assert (r, ours.scaling(r, alpha)) == (pr, theirs.scaling(pr, palpha)), mod
    t = load_file(str(out / pio.WEIGHTS_NAME))
    assert {k: v.shape for k, v in t.items()} == {k: v.shape for k, v in peft.items()}


def test_convert_to_lora_exact_at_full_rank_stacked_and_new_name():
    rng = np.random.default_rng(3)
    base = {"layers": {"fc": {"kernel": jnp.asarray(rng.normal(size=(3, 6, 5)), jnp.float32)}}}
    cfg = pj.LoHaConfig(r=2, alpha=4, target_modules=["fc"], layers_to_transform=[0, 2])
    q = randomize(pj.inject(base, cfg, key=0, layouts=pj.Layout("dense", stack=1)))
    lo = pj.convert_to_lora(q, 5, new_name="lora")  # full rank: exact
    assert pj.adapter_names(lo) == ("default", "lora") and pj.active(lo) == ("default",)
    spec = lo["layers"]["fc"]["kernel"].spec("lora")
    assert spec.layers == (0, 2) and spec.scaling == (1.0, 0.0, 1.0) and spec.r == 5
    np.testing.assert_allclose(
        pj.merge_and_unload(lo, "lora")["layers"]["fc"]["kernel"],
        pj.merge_and_unload(q)["layers"]["fc"]["kernel"],
        atol=2e-5,
    )
    with pytest.warns(UserWarning, match="already a LoRA adapter"):
        pj.convert_to_lora(pj.delete(lo, "default"), 2, "lora")


def test_convert_to_lora_refuses(tp):
    mlp = flax_from_torch(load_file(str(FIX / "lora_linear" / "base.safetensors")))
    loha = pj.load_pretrained(mlp, FIX / "convert_loha_rank3")
    for case in ("dora_linear", "ia3_mlp"):
        q = pj.load_pretrained(mlp, FIX / case)
        assert not pj.supports_lora_conversion(q)
        with pytest.raises(pj.UnsupportedModuleError, match="`fc1`"):
            pj.convert_to_lora(q, 2)
    cnn = flax_from_torch(load_file(str(FIX / "loha_conv2d" / "base.safetensors")))
    assert not pj.supports_lora_conversion(pj.load_pretrained(cnn, FIX / "loha_conv2d"))
    assert not pj.supports_lora_conversion(tp[2])  # target_parameters: PEFT's ParamWrapper
    for rank, match in [(0, "rank"), (1.5, "threshold"), (-1, "rank"), (True, "rank")]:
        with pytest.raises(pj.ConfigError, match=match):
            pj.convert_to_lora(loha, rank)
    with pytest.raises(pj.ConfigError, match="module `fc1`.*larger than the weight shape"):
        pj.convert_to_lora(loha, 13)
    with pytest.raises(pj.MergeError, match="unmerge"):
        pj.convert_to_lora(pj.merge(loha), 2)
    with pytest.raises(pj.AdapterNameError):
        pj.convert_to_lora(loha, 2, "nope")
