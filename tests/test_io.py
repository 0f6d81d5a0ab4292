"""HF PEFT adapter files: every PEFT-made fixture loads, merges to PEFT's weights and saves back
bit for bit; peftjax-made adapters round-trip (every row of the case table, ``tests/cases.py``,
whose method has a PEFT file format); bad files fail with clear errors and change nothing.
(PEFT itself loading peftjax's files is checked by ``tests/fixtures/peft_roundtrip_check.py``,
which needs torch.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import peftjax as pj
from peftjax import io as pio
from tests.cases import file_rows, injected
from tests.conftest import randomize
from tests.reference import lora_scaling, pattern_lookup

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
SUPPORTED = [
    "lora_linear",
    "lora_rslora_patterns",
    "dora_linear",
    "lora_conv2d",
    "lora_embedding",
    "loha_linear",
    "loha_conv2d",
    "lokr_linear_full",
    "lokr_linear_decomposed",
    "lokr_linear_decompose_both",
    "lokr_conv2d",
    "lokr_conv2d_full",
    "loha_conv2d_effective",
    "lokr_conv2d_effective",
    "ia3_mlp",
    "llama_lora",
    "llama_dora",
    "llama_loha",
    "llama_lokr",
    "llama_ia3",
]
LLAMA = [c for c in SUPPORTED if c.startswith("llama")]
EMBEDDINGS = ("emb", "embed_tokens")
STACKED = {r"model\.layers\..*": pj.Layout("dense", stack=1)}


# ---------------------------------------------------------------------------------- helpers


def flax_from_torch(sd: dict, prefix: str = "", embeddings=None) -> dict:
    """A torch ``state_dict`` as a Flax params tree with HF Flax names: Linear ``weight [out, in]``
    -> ``kernel [in, out]``, Conv2d -> ``kernel [kh, kw, in, out]``, Embedding (a module named
    in ``embeddings``, default `EMBEDDINGS`) -> ``embedding``; 1-D weights (biases, RMSNorm
    ``weight``) unchanged."""
    embeddings = EMBEDDINGS if embeddings is None else embeddings
    out: dict = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        *mods, p = k[len(prefix) :].split(".")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        if v.ndim == 2 and mods[-1] in embeddings:
            node["embedding"] = jnp.asarray(v)
        elif v.ndim == 2:
            node["kernel"] = jnp.asarray(v.T)
        elif v.ndim == 4:
            node["kernel"] = jnp.asarray(v.transpose(2, 3, 1, 0))
        else:
            node[p] = jnp.asarray(v)
    return out


def base_params(case: str) -> dict:
    return flax_from_torch(load_file(str(FIX / case / "base.safetensors")))


def io_data(case: str) -> dict:
    return load_file(str(FIX / case / "io.safetensors"))


def snapshot(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=pj.Adapted.__instancecheck__)
    return treedef, [(kp, repr(x) if isinstance(x, pj.Adapted) else np.array(x)) for kp, x in flat]


def assert_unchanged(tree, snap):
    treedef, items = snapshot(tree)
    assert treedef == snap[0]
    for (kp, a), (kp2, b) in zip(items, snap[1], strict=True):
        assert kp == kp2
        if isinstance(a, str):
            assert a == b
        else:
            np.testing.assert_array_equal(a, b)


def assert_trees_close(got, want, atol=1e-5):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (kp, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        assert a.shape == b.shape and a.dtype == b.dtype, kp
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5, err_msg=str(kp)
        )


def adapter_arrays(tree, name="default") -> dict[str, tuple]:
    """``{module path / leaf: (spec, arrays)}`` of adapter ``name``."""
    out = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=pj.Adapted.__instancecheck__)
    for kp, x in flat:
        if isinstance(x, pj.Adapted) and name in x.names:
            out[jax.tree_util.keystr(kp)] = (x.spec(name), x.arrays[name])
    return out


def perturb(tree, seed=0, name="default"):
    """Random values in every array of adapter ``name`` (IA3 vectors stay positive)."""
    rng = np.random.default_rng(seed)

    def node(x):
        if not isinstance(x, pj.Adapted) or name not in x.names:
            return x
        new = {}
        for k, a in x.arrays[name].items():
            v = rng.normal(0, 0.3, a.shape) if k != "ia3_l" else 0.5 + rng.random(a.shape)
            new[k] = jnp.asarray(v, a.dtype)
        return x.replace(arrays={**x.arrays, name: new})

    return jax.tree_util.tree_map(node, tree, is_leaf=pj.Adapted.__instancecheck__)


def fresh(base, config, seed=0, **kw):
    """``perturb(pj.inject(base, config, ...))`` without computing the initial values (they are
    all replaced): injects under ``jax.eval_shape`` and puts the real base leaves back."""
    shapes = jax.eval_shape(lambda p: pj.inject(p, config, key=jax.random.key(0), **kw), base)
    leaves = jax.tree_util.tree_leaves(base)
    flat, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=pj.Adapted.__instancecheck__)
    out = []
    for x, b in zip(flat, leaves, strict=True):
        if isinstance(x, pj.Adapted):
            arrays = {
                n: {k: jnp.zeros(v.shape, v.dtype) for k, v in a.items()}
                for n, a in x.arrays.items()
            }
            x = x.replace(base=b, arrays=arrays)
        out.append(x if isinstance(x, pj.Adapted) else b)
    return perturb(jax.tree_util.tree_unflatten(treedef, out), seed)


def copy_case(case: str, dst: Path) -> Path:
    d = dst / case
    shutil.copytree(FIX / case, d)
    return d


def rewrite_weights(d: Path, edit) -> None:
    t = load_file(str(d / pio.WEIGHTS_NAME))
    edit(t)
    save_file(t, str(d / pio.WEIGHTS_NAME), metadata={"format": "pt"})


def module_math(cfg: dict, modules: list[str]) -> dict:
    """Per-module ``(r, scaling, use_dora, feedforward)`` a PEFT config gives ``modules``."""
    out = {}
    for m in modules:
        r = pattern_lookup(cfg.get("rank_pattern") or {}, m, cfg.get("r"))
        a = pattern_lookup(
            cfg.get("alpha_pattern") or {}, m, cfg.get("lora_alpha", cfg.get("alpha"))
        )
        ff = cfg.get("feedforward_modules") or []
        if cfg["peft_type"] == "IA3":
            s = None
        else:
            s = round(lora_scaling(r, a, cfg.get("use_rslora", False)), 9)
        out[m] = (r, s, cfg.get("use_dora"), any(m.endswith(f) for f in ff))
    return out


# ---------------------------------------------------------------------------------- PEFT files in


@pytest.mark.parametrize("case", SUPPORTED)
def test_peft_fixture_merges_to_peft_weights(case):
    params = base_params(case)
    snap = snapshot(params)
    loaded = pio.load_pretrained(params, FIX / case)
    assert_unchanged(params, snap)
    assert pj.active(loaded) == ("default",)
    assert_trees_close(pj.merge_and_unload(loaded), flax_from_torch(io_data(case), "merged."))
    assert_trees_close(pj.unload(loaded), params, atol=0)


@pytest.fixture(scope="module")
def flax_llama():
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((FIX / "llama_lora" / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)
    shapes = jax.eval_shape(lambda k: model.init_weights(k, (1, 4)), jax.random.key(0))
    logits = jax.jit(lambda p, ids: model(ids, params=p).logits)
    return model, shapes, logits


@pytest.mark.parametrize(
    "case",  # LoRA in the default run, the other methods' Llama fixtures with -m slow
    [c if c == "llama_lora" else pytest.param(c, marks=pytest.mark.slow) for c in LLAMA],
)
def test_llama_through_hf_flax_model(case, flax_llama):
    model, shapes, logits = flax_llama
    params = base_params(case)
    # the torch -> Flax names are HF Flax Llama's own
    assert jax.tree_util.tree_map(lambda x: x.shape, params) == jax.tree_util.tree_map(
        lambda x: x.shape, shapes
    )
    io = io_data(case)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    loaded = pio.load_pretrained(params, FIX / case)
    got = logits(pj.merge_and_unload(loaded), ids)
    np.testing.assert_allclose(np.asarray(got), io["logits_adapted"], atol=1e-4, rtol=1e-4)
    base = logits(pj.unload(loaded), ids)
    np.testing.assert_allclose(np.asarray(base), io["logits_base"], atol=1e-4, rtol=1e-4)
    if hasattr(pj, "apply"):  # unmerged forward through the third-party model
        fwd = pj.apply(lambda p, i: model(i, params=p).logits)(loaded, ids)
        np.testing.assert_allclose(np.asarray(fwd), io["logits_adapted"], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("case", SUPPORTED)
def test_peft_fixture_saves_back_bit_for_bit(case, tmp_path):
    loaded = pio.load_pretrained(base_params(case), FIX / case)
    out = pio.save_pretrained(loaded, tmp_path)
    assert sorted(os.listdir(out)) == [pio.CONFIG_NAME, pio.WEIGHTS_NAME]  # no temp files left
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    got, meta = pio.read_safetensors(out / pio.WEIGHTS_NAME)
    # PEFT's metadata plus the digest of the config (PEFT ignores unknown metadata)
    assert meta == {
        "format": "pt",
        pio.DIGEST_KEY: pio.config_digest(json.loads((out / pio.CONFIG_NAME).read_text())),
    }
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the rebuilt config gives every module PEFT's r and scaling
    fixture_cfg = json.loads((FIX / case / pio.CONFIG_NAME).read_text())
    saved_cfg = json.loads((out / pio.CONFIG_NAME).read_text())
    modules = pio.inspect_adapter(FIX / case)["targets"]
    assert saved_cfg["peft_type"] == fixture_cfg["peft_type"]
    assert saved_cfg["inference_mode"] is True
    assert module_math(saved_cfg, modules) == module_math(fixture_cfg, modules)
    # with the original config passed, the file is PEFT's but for bookkeeping fields
    config = pio.read_adapter(FIX / case)[0]
    pio.save_pretrained(loaded, tmp_path / "orig", config=config)
    again = json.loads((tmp_path / "orig" / pio.CONFIG_NAME).read_text())
    assert set(again.pop("target_modules")) == set(fixture_cfg.pop("target_modules"))
    again.pop("auto_mapping"), fixture_cfg.pop("auto_mapping")
    assert again == fixture_cfg


def test_rebuilt_config_recognises_rslora(tmp_path):
    loaded = pio.load_pretrained(base_params("lora_rslora_patterns"), FIX / "lora_rslora_patterns")
    pio.save_pretrained(loaded, tmp_path)
    cfg = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert cfg["use_rslora"] is True
    assert (cfg["r"], cfg["rank_pattern"]) == (4, {"fc2": 2})
    assert {cfg["lora_alpha"], *cfg["alpha_pattern"].values()} == {3, 8}
    assert cfg["target_modules"] == ["fc1", "fc2"]


def small_tree(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: jnp.asarray(rng.normal(0, 0.5, s), jnp.float32)  # noqa: E731
    return {
        "params": {
            "fc1": {"kernel": r(6, 8), "bias": r(8)},
            "fc2": {"kernel": r(8, 6), "bias": r(6)},
            "conv": {"kernel": r(3, 3, 4, 8), "bias": r(8)},
            "emb": {"embedding": r(10, 6)},
            "dg": {"kernel": r(6, 2, 3)},
            "norm": {"scale": r(6), "bias": r(6)},
            "head": {"kernel": r(6, 5), "bias": r(5)},
        }
    }


DG = {"dg": pj.Layout("dense", n_in=1)}
#: configs on `small_tree` for the file-layout checks (`test_fresh_file_layouts`); "lora" and
#: "loha" also carry per-module ``rank_pattern`` / ``alpha_pattern`` values, which the case
#: table's rows do not (`test_fresh_patterns_round_trip`)
FRESH = {
    "lora": pj.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["fc1", "fc2", "conv", "emb", "dg"],
        rank_pattern={"fc2": 2},
        alpha_pattern={"conv": 3},
        use_rslora=True,
        modules_to_save=["head"],
    ),
    "dora": pj.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "conv", "dg"], use_dora=True),
    "loha": pj.LoHaConfig(
        r=2, alpha=4, target_modules=["fc1", "conv", "dg"], rank_pattern={"fc1": 3}
    ),
    "lokr": pj.LoKrConfig(r=2, alpha=3, target_modules=["fc1", "fc2", "conv"], decompose_both=True),
    "lokr_full": pj.LoKrConfig(r=16, alpha=3, target_modules=["fc1", "conv"]),
    "loha_effective": pj.LoHaConfig(
        r=2, alpha=4, target_modules=["fc1", "conv"], use_effective_conv2d=True
    ),
    "lokr_effective": pj.LoKrConfig(
        r=1, alpha=2, target_modules=["fc1", "conv"], use_effective_conv2d=True
    ),
    "ia3": pj.IA3Config(target_modules=["fc1", "fc2", "conv"], feedforward_modules=["fc2"]),
    "ln": pj.LNTuningConfig(target_modules=["norm"]),
}


def assert_round_trip(tree, base, path, layouts=None):
    """``tree`` (adapter "default" on ``base``) saved to ``path`` loads back onto ``base`` as the
    same adapter: the same specs (up to float rounding of the scalings, rebuilt from r and
    alpha), the same arrays bit for bit (as constrained, `pj.constrain`: what a file holds), the
    same base; ``base`` is not modified."""
    pio.save_pretrained(tree, path)
    snap = snapshot(base)
    back = pio.load_pretrained(base, path, layouts=layouts)
    assert_unchanged(base, snap)
    want, got = adapter_arrays(pj.constrain(tree)), adapter_arrays(back)
    assert sorted(got) == sorted(want)
    for k, (spec, arrays) in want.items():
        spec2, arrays2 = got[k]
        assert dataclasses_equal_but_scaling(spec, spec2), (k, spec, spec2)
        np.testing.assert_allclose(spec2.scaling, spec.scaling, rtol=1e-12)
        assert sorted(arrays2) == sorted(arrays)
        for n in arrays:
            assert arrays2[n].dtype == arrays[n].dtype
            np.testing.assert_array_equal(np.asarray(arrays2[n]), np.asarray(arrays[n]), err_msg=n)
    assert pj.adapter_names(back) == pj.adapter_names(tree)
    assert_trees_close(pj.unload(back), base, atol=0)


@pytest.mark.parametrize("case", file_rows(), ids=str)
def test_case_adapter_round_trip(case, tmp_path):
    """Every case-table row whose method has a PEFT file format: a fresh adapter with random
    arrays saves and loads back as the same adapter (stacked rows through the default
    `stacked_key_map`, per-layer PEFT keys)."""
    base, q = injected(case)
    assert_round_trip(randomize(q, seed=2), base, tmp_path, layouts=case.layouts)


@pytest.mark.parametrize("which", ["lora", "loha"])
def test_fresh_patterns_round_trip(which, tmp_path):
    """Per-module ranks and alphas (``rank_pattern`` / ``alpha_pattern``), rsLoRA, an
    embedding, a DenseGeneral kernel and ``modules_to_save`` in one adapter."""
    base = small_tree()
    assert_round_trip(fresh(base, FRESH[which], layouts=DG), base, tmp_path, layouts=DG)


def dataclasses_equal_but_scaling(a, b) -> bool:
    import dataclasses

    return type(a) is type(b) and dataclasses.replace(a, scaling=()) == dataclasses.replace(
        b, scaling=()
    )


def test_fresh_file_layouts(tmp_path):
    """PEFT key names and torch layouts of every kind of array."""
    base = small_tree()
    tree = fresh(base, FRESH["lora"], layouts=DG)
    pio.save_pretrained(tree, tmp_path)
    t, _ = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)
    shapes = {k.removeprefix(pio.PREFIX): v.shape for k, v in t.items()}
    assert shapes == {
        "fc1.lora_A.weight": (4, 6),
        "fc1.lora_B.weight": (8, 4),
        "fc2.lora_A.weight": (2, 8),
        "fc2.lora_B.weight": (6, 2),
        "conv.lora_A.weight": (4, 4, 3, 3),
        "conv.lora_B.weight": (8, 4, 1, 1),
        "emb.lora_embedding_A": (4, 10),
        "emb.lora_embedding_B": (6, 4),
        "dg.lora_A.weight": (4, 6),  # DenseGeneral (6, 2, 3) = torch Linear(6, 6)
        "dg.lora_B.weight": (6, 4),
        "head.weight": (5, 6),  # modules_to_save: the plain torch key
        "head.bias": (5,),
    }
    head = adapter_arrays(tree)["['params']['head']['kernel']"][1]["weight"]
    np.testing.assert_array_equal(t[pio.PREFIX + "head.weight"], np.asarray(head).T)
    a = np.asarray(adapter_arrays(tree)["['params']['conv']['kernel']"][1]["lora_A"])
    np.testing.assert_array_equal(t[pio.PREFIX + "conv.lora_A.weight"], a.transpose(3, 2, 0, 1))
    cfg = json.loads((tmp_path / pio.CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["head"]
    assert (cfg["peft_type"], cfg["use_rslora"]) == ("LORA", True)

    for which, want in [
        ("dora", {"fc1.lora_magnitude_vector": (8,), "conv.lora_magnitude_vector": (1, 8, 1, 1)}),
        ("ia3", {"fc1.ia3_l": (8, 1), "fc2.ia3_l": (1, 8), "conv.ia3_l": (1, 8, 1, 1)}),
        ("ln", {"norm.ln_tuning_layers.weight": (6,), "norm.ln_tuning_layers.bias": (6,)}),
        ("lokr_full", {"conv.lokr_w2": (4, 2, 3, 3), "fc1.lokr_w2": (4, 3)}),
        ("loha_effective", {"conv.hada_t1": (2, 2, 3, 3), "conv.hada_w1_a": (2, 8)}),
        ("lokr_effective", {"conv.lokr_t2": (1, 1, 3, 3), "conv.lokr_w2_a": (1, 4)}),
    ]:
        d = tmp_path / which
        pio.save_pretrained(fresh(base, FRESH[which], layouts=DG), d)
        t, _ = pio.read_safetensors(d / pio.WEIGHTS_NAME)
        got = {k.removeprefix(pio.PREFIX): v.shape for k, v in t.items()}
        assert want.items() <= got.items(), (which, got)


def test_stacked_layers_load_and_save_per_layer_keys(tmp_path):
    case = "llama_lora"
    flat = base_params(case)
    layers = flat["model"]["layers"]
    stacked = {
        **flat,
        "model": {
            **flat["model"],
            "layers": jax.tree_util.tree_map(lambda *x: jnp.stack(x), layers["0"], layers["1"]),
        },
    }
    loaded = pio.load_pretrained(stacked, FIX / case, layouts=STACKED)
    assert pj.targeted_modules(loaded) == [
        f"model.layers.self_attn.{p}_proj" for p in ("k", "o", "q", "v")
    ]
    merged = pj.merge_and_unload(loaded)
    ml = merged["model"]["layers"]
    unstacked = {
        **merged,
        "model": {
            **merged["model"],
            "layers": {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], ml) for i in range(2)},
        },
    }
    assert_trees_close(unstacked, flax_from_torch(io_data(case), "merged."))
    # one stacked adapter -> PEFT's per-layer keys, bit for bit
    pio.save_pretrained(loaded, tmp_path / "all")
    got, _ = pio.read_safetensors(tmp_path / "all" / pio.WEIGHTS_NAME)
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])

    # a file with layer 0 only: layer 1 is switched off, and saved back without it
    d = copy_case(case, tmp_path)
    rewrite_weights(d, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k])
    # the config still targets layer 1: strict loading names what the file lacks
    with pytest.raises(pj.FormatError, match=r"q_proj \[layer 1\]"):
        pio.load_pretrained(stacked, d, layouts=STACKED)
    part = pio.load_pretrained(stacked, d, layouts=STACKED, strict=False)
    q = adapter_arrays(part)["['model']['layers']['self_attn']['q_proj']['kernel']"][0]
    assert q.scaling == (2.0, 0.0)
    m = pj.merge_and_unload(part)["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        m[1], stacked["model"]["layers"]["self_attn"]["q_proj"]["kernel"][1]
    )
    pio.save_pretrained(part, tmp_path / "part")
    keys = pio.read_safetensors(tmp_path / "part" / pio.WEIGHTS_NAME)[0]
    assert keys and all(".layers.0." in k for k in keys)


def test_stacked_key_map(tmp_path):
    km = pio.stacked_key_map()
    assert km("model.layers.self_attn.q_proj", 3) == "model.layers.3.self_attn.q_proj"
    assert km("lm_head") == "lm_head"
    rng = np.random.default_rng(0)
    base = {"blocks": {"q": {"kernel": jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)}}}
    lay = {"blocks.q": pj.Layout("dense", stack=1)}
    tree = fresh(base, pj.LoraConfig(r=2, target_modules=["q"]), layouts=lay)
    with pytest.raises(pj.FormatError, match="layers_name"):
        pio.save_pretrained(tree, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    km = pio.stacked_key_map("blocks")
    pio.save_pretrained(tree, tmp_path / "y", key_map=km)
    keys = sorted(pio.read_safetensors(tmp_path / "y" / pio.WEIGHTS_NAME)[0])
    assert keys == [f"{pio.PREFIX}blocks.{i}.q.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]
    back = pio.load_pretrained(base, tmp_path / "y", key_map=km, layouts=lay)
    a, b = adapter_arrays(tree), adapter_arrays(back)
    for k in a:
        for n in a[k][1]:
            np.testing.assert_array_equal(np.asarray(b[k][1][n]), np.asarray(a[k][1][n]))


def test_custom_key_map(tmp_path):
    inner = base_params("lora_linear")
    params = {"encoder": inner}
    km = lambda p: p.removeprefix("encoder.")  # noqa: E731
    loaded = pio.load_pretrained(params, FIX / "lora_linear", key_map=km)
    assert pj.targeted_modules(loaded) == ["encoder.fc1", "encoder.fc2"]
    want = flax_from_torch(io_data("lora_linear"), "merged.")
    assert_trees_close(pj.merge_and_unload(loaded)["encoder"], want)
    pio.save_pretrained(loaded, tmp_path, key_map=km)
    got = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)[0]
    assert sorted(got) == sorted(load_file(str(FIX / "lora_linear" / pio.WEIGHTS_NAME)))
    with pytest.raises(pj.FormatError, match="match no module"):
        pio.load_pretrained(params, FIX / "lora_linear")


def test_named_adapters_and_two_adapters(tmp_path):
    params = base_params("lora_linear")
    tree = pio.load_pretrained(params, FIX / "lora_linear")
    tree = pio.load_pretrained(tree, FIX / "loha_linear", name="other")
    assert pj.adapter_names(tree) == ("default", "other")
    assert pj.active(tree) == ("default",)
    out = pio.save_pretrained(tree, tmp_path, name="other")
    assert out == tmp_path / "other" and (out / pio.CONFIG_NAME).exists()
    assert not (tmp_path / pio.WEIGHTS_NAME).exists()
    got = pio.read_safetensors(out / pio.WEIGHTS_NAME)[0]
    assert sorted(got) == sorted(load_file(str(FIX / "loha_linear" / pio.WEIGHTS_NAME)))
    for where in (out, tmp_path):  # the adapter's own dir, or PEFT's parent dir
        back = pio.load_pretrained(params, where, name="other")
        assert pj.adapter_names(back) == ("other",)
    with pytest.raises(pj.AdapterNameError):
        pio.load_pretrained(tree, FIX / "lora_linear")
    with pytest.raises(pj.AdapterNameError, match="nope"):
        pio.save_pretrained(tree, tmp_path / "n", name="nope")
    assert not (tmp_path / "n").exists()


def test_dtypes(tmp_path):
    loaded = pio.load_pretrained(base_params("lora_linear"), FIX / "lora_linear")
    pio.save_pretrained(loaded, tmp_path, dtype=jnp.bfloat16)
    t, _ = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)
    assert {v.dtype for v in t.values()} == {np.dtype(ml_dtypes.bfloat16)}
    header = json.loads((tmp_path / pio.WEIGHTS_NAME).read_bytes()[8:].split(b"}}")[0] + b"}}")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    back = pio.load_pretrained(base_params("lora_linear"), tmp_path)
    for _, arrays in adapter_arrays(back).values():
        assert all(a.dtype == jnp.float32 for a in arrays.values())
    back16 = pio.load_pretrained(base_params("lora_linear"), tmp_path, dtype=jnp.bfloat16)
    a16 = adapter_arrays(back16)["['fc1']['kernel']"][1]["lora_A"]
    a32 = adapter_arrays(loaded)["['fc1']['kernel']"][1]["lora_A"]
    assert a16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a16), np.asarray(a32.astype(jnp.bfloat16)))
    # float32 files are ordinary safetensors
    pio.save_pretrained(loaded, tmp_path / "f32")
    ours = load_file(str(tmp_path / "f32" / pio.WEIGHTS_NAME))
    mine = pio.read_safetensors(tmp_path / "f32" / pio.WEIGHTS_NAME)[0]
    assert sorted(ours) == sorted(mine)
    for k in ours:
        np.testing.assert_array_equal(ours[k], mine[k])


def test_base_layer_weights_in_file_replace_the_base(tmp_path):
    """PEFT saves a targeted embedding's base weights (``...base_layer.weight``) in some cases."""
    d = copy_case("lora_embedding", tmp_path)
    new = np.arange(50 * 16, dtype=np.float32).reshape(50, 16)
    rewrite_weights(d, lambda t: t.update({pio.PREFIX + "emb.base_layer.weight": new}))
    params = base_params("lora_embedding")
    loaded = pio.load_pretrained(params, d)
    np.testing.assert_array_equal(np.asarray(pj.unload(loaded)["emb"]["embedding"]), new)


def test_read_and_inspect():
    config, tensors = pio.read_adapter(FIX / "llama_dora")
    assert isinstance(config, pj.LoraConfig) and config.use_dora
    assert all(k.startswith(pio.PREFIX) for k in tensors)
    info = pio.inspect_adapter(FIX / "llama_dora")
    assert info["method"] == "dora" and info["peft_type"] == "LORA"
    assert len(info["targets"]) == 8 and set(info["ranks"].values()) == {4}
    assert info["n_params"] == sum(v.size for v in tensors.values())
    assert info["dtype"] == "float32"
    assert info["file_size"] == (FIX / "llama_dora" / pio.WEIGHTS_NAME).stat().st_size
    info = pio.inspect_adapter(FIX / "lora_rslora_patterns")
    assert info["ranks"] == {"fc1": 4, "fc2": 2}
    assert pio.inspect_adapter(FIX / "ia3_mlp")["ranks"] == {}


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def mlp():
    params = base_params("lora_linear")
    return params, snapshot(params)


def test_missing_dir_and_files(tmp_path, mlp):
    params, snap = mlp
    with pytest.raises(pj.FormatError, match="does not exist"):
        pio.load_pretrained(params, tmp_path / "nope")
    with pytest.raises(pj.FormatError, match="adapter_config.json"):
        pio.load_pretrained(params, tmp_path)
    d = copy_case("lora_linear", tmp_path)
    (d / pio.WEIGHTS_NAME).unlink()
    with pytest.raises(pj.FormatError, match="adapter_model.safetensors"):
        pio.load_pretrained(params, d)
    assert_unchanged(params, snap)


def test_pickle_only_dir_is_refused(tmp_path, mlp):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    (d / pio.WEIGHTS_NAME).rename(d / "adapter_model.bin")
    with pytest.raises(pj.FormatError, match="never loads pickle") as e:
        pio.load_pretrained(params, d)
    assert "safetensors" in str(e.value)
    assert_unchanged(params, snap)


@pytest.mark.parametrize("cut", [0.5, 0.999, 5])
def test_truncated_safetensors(tmp_path, mlp, cut):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    f = d / pio.WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)] if cut < 1 else data[:cut])
    with pytest.raises(pj.FormatError) as e:
        pio.load_pretrained(params, d)
    assert str(f) in str(e.value)
    assert_unchanged(params, snap)


def test_wrong_shape_names_key_and_shapes(tmp_path, mlp):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    key = pio.PREFIX + "fc2.lora_B.weight"
    rewrite_weights(d, lambda t: t.update({key: np.zeros((12, 3), np.float32)}))
    with pytest.raises(pj.ShapeError) as e:
        pio.load_pretrained(params, d)
    msg = str(e.value)
    assert key in msg and "[12, 3]" in msg and "[12, 4]" in msg
    assert_unchanged(params, snap)


def test_keys_matching_no_module_are_listed(tmp_path, mlp):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    extra = [pio.PREFIX + "fc9.lora_A.weight", pio.PREFIX + "blocks.0.lora_B.weight"]
    rewrite_weights(d, lambda t: t.update({k: np.zeros((4, 4), np.float32) for k in extra}))
    with pytest.raises(pj.FormatError, match="match no module") as e:
        pio.load_pretrained(params, d)
    assert all(k in str(e.value) for k in extra)
    assert_unchanged(params, snap)
    loaded = pio.load_pretrained(params, d, strict=False)
    assert pj.targeted_modules(loaded) == ["fc1", "fc2"]


def test_keys_that_do_not_fit_the_config(tmp_path, mlp):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    key = pio.PREFIX + "fc1.lora_magnitude_vector"  # DoRA weights in a non-DoRA file
    rewrite_weights(d, lambda t: t.update({key: np.ones((20,), np.float32)}))
    with pytest.raises(pj.FormatError, match="do not fit") as e:
        pio.load_pretrained(params, d)
    assert key in str(e.value)
    d2 = copy_case("dora_linear", tmp_path)
    rewrite_weights(d2, lambda t: t.pop(pio.PREFIX + "fc2.lora_B.weight"))
    with pytest.raises(pj.FormatError, match="lacks") as e:
        pio.load_pretrained(params, d2)
    assert "fc2.lora_B.weight" in str(e.value)
    assert_unchanged(params, snap)


@pytest.mark.parametrize(
    "edit, error, match",
    [
        ({"peft_type": "FOURIERFT"}, pj.FormatError, "LORA"),
        ({"peft_type": None}, pj.FormatError, "peft_type"),
        ({"use_qalora": True}, pj.ConfigError, "use_qalora"),
        ({"lora_bias": True}, pj.ConfigError, "lora_bias"),
        ({"init_lora_weights": "pissa"}, pj.ConfigError, "init_lora_weights"),
    ],
)
def test_bad_configs(tmp_path, mlp, edit, error, match):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    cfg = json.loads((d / pio.CONFIG_NAME).read_text())
    cfg.update(edit)
    (d / pio.CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        pio.load_pretrained(params, d)
    assert_unchanged(params, snap)


def test_broken_config_json(tmp_path, mlp):
    params, snap = mlp
    d = copy_case("lora_linear", tmp_path)
    (d / pio.CONFIG_NAME).write_text("{not json")
    with pytest.raises(pj.FormatError, match="JSON"):
        pio.load_pretrained(params, d)
    assert_unchanged(params, snap)


def test_save_checks_a_given_config(tmp_path):
    loaded = pio.load_pretrained(base_params("lora_linear"), FIX / "lora_linear")
    snap = snapshot(loaded)
    for bad, match in [
        (pj.LoraConfig(r=8, lora_alpha=8, target_modules=["fc1", "fc2"]), "r=8"),
        (pj.LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"]), "scaling"),
        (pj.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"]), "fc2"),
        (pj.LoHaConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]), "LoHaConfig"),
    ]:
        with pytest.raises(pj.ConfigError, match=match):
            pio.save_pretrained(loaded, tmp_path / "x", config=bad)
    assert not (tmp_path / "x").exists()
    assert_unchanged(loaded, snap)
    ok = pj.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["fc1", "fc2"])
    pio.save_pretrained(loaded, tmp_path / "ok", config=ok)
    assert math.isclose(
        json.loads((tmp_path / "ok" / pio.CONFIG_NAME).read_text())["lora_alpha"], 4
    )


def test_nnx_state(tmp_path):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(12, 20, rngs=rngs)
            self.fc2 = nnx.Linear(20, 12, rngs=rngs)

        def __call__(self, x):
            return self.fc2(jax.nn.relu(self.fc1(x)))

    graphdef, state = nnx.split(nnx.eval_shape(lambda: MLP(nnx.Rngs(0))))
    base = base_params("lora_linear")
    for m in ("fc1", "fc2"):
        for p in ("kernel", "bias"):
            state[m][p].set_value(base[m][p])
    loaded = pio.load_pretrained(state, FIX / "lora_linear")
    assert pj.targeted_modules(loaded) == ["fc1", "fc2"]
    merged = nnx.merge(graphdef, pj.merge_and_unload(loaded))
    want = flax_from_torch(io_data("lora_linear"), "merged.")
    for m in ("fc1", "fc2"):
        np.testing.assert_allclose(getattr(merged, m).kernel[...], want[m]["kernel"], atol=1e-5)
    pio.save_pretrained(loaded, tmp_path)
    got = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)[0]
    want = pio.read_safetensors(FIX / "lora_linear" / pio.WEIGHTS_NAME)[0]
    assert sorted(got) == sorted(want)


def test_stacked_ln_tuning_copies_are_one_peft_module_per_layer(tmp_path):
    """A scanned model's norms (stacked ``(L, features)``) copied by LN tuning save as PEFT's
    per-layer modules (``layers.<i>.final_ln.ln_tuning_layers.weight``) and load back stacked."""
    from tests.conftest import STACKED_LAYOUT, make_stacked

    base = make_stacked()
    cfg = pj.LNTuningConfig(target_modules=["final_ln"])
    params = randomize(pj.inject(base, cfg, key=0, layouts=STACKED_LAYOUT), seed=3)
    pio.save_pretrained(params, tmp_path)
    keys = sorted(load_file(tmp_path / pio.WEIGHTS_NAME))
    want = [
        f"base_model.model.layers.{i}.final_ln.ln_tuning_layers.{p}"
        for i in range(3)
        for p in ("bias", "weight")
    ]
    assert keys == want
    back = pio.load_pretrained(base, tmp_path, layouts=STACKED_LAYOUT)
    got = back["params"]["layers"]["final_ln"]["scale"].arrays["default"]["weight"]
    np.testing.assert_array_equal(
        got, params["params"]["layers"]["final_ln"]["scale"].arrays["default"]["weight"]
    )
    # one layer missing from the file: strict loading names it
    d2 = tmp_path / "lacking"
    d2.mkdir()
    t = load_file(tmp_path / pio.WEIGHTS_NAME)
    del t["base_model.model.layers.1.final_ln.ln_tuning_layers.weight"]
    save_file(t, d2 / pio.WEIGHTS_NAME)
    shutil.copy(tmp_path / pio.CONFIG_NAME, d2 / pio.CONFIG_NAME)
    with pytest.raises(pj.FormatError, match=r"layers\.final_ln\[layer 1\]\.weight"):
        pio.load_pretrained(base, d2, layouts=STACKED_LAYOUT)
