"""Adapters on a device mesh (`peftjax.sharding`), on 8 simulated CPU devices (conftest sets
``--xla_force_host_platform_device_count=8``).

The mesh is ``(data=2, fsdp=2, tensor=2)`` with Auto axes; base kernels are sharded
``P("fsdp", "tensor")`` (FSDP on the input axis, tensor parallelism on the output axis).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import peftjax as pj
from tests.conftest import assert_unchanged, make_llama, snapshot

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

FIX = Path(__file__).parent / "fixtures" / "peft"
KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def norm(spec) -> tuple:
    """A PartitionSpec without trailing Nones (JAX may drop them)."""
    t = list(spec)
    while t and t[-1] is None:
        t.pop()
    return tuple(t)


def kernel_spec(names: tuple[str, ...], x) -> P:
    if names[-1] == "kernel" and x.ndim == 2:
        return P("fsdp", "tensor")
    if names[-1] == "embedding":
        return P("tensor", "fsdp")
    return P()


def base_specs(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: kernel_spec(tuple(str(getattr(k, "key", k)) for k in kp), x), params
    )


def on_mesh(params, mesh):
    return jax.device_put(
        params, jax.tree.map(lambda s: NamedSharding(mesh, s), base_specs(params))
    )


def same(a, b) -> bool:
    """Two shardings place an array of ``ndim`` dims alike (trailing ``None``s aside)."""
    return a.mesh == b.mesh and norm(a.spec) == norm(b.spec)


def node(params, path: str):
    t = params
    for k in path.split("."):
        t = t[k]
    return t


def specs_of(n, name="default") -> dict:
    return {k: norm(v.sharding.spec) for k, v in n.arrays[name].items()}


# ------------------------------------------------------------------------ the rule, per method

ATTN = "params.model.layers.0.self_attn"
MLP = "params.model.layers.0.mlp"

# (config, module, {array: expected spec}) on a (16, 16) q_proj / (24, 16) down_proj / (16, 8)
# v_proj kernel sharded P("fsdp", "tensor")
RULES = [
    (pj.LoraConfig(r=4, target_modules=["q_proj"]), "q_proj",
     {"lora_A": ("fsdp",), "lora_B": (None, "tensor")}),
    (pj.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "q_proj",
     {"lora_A": ("fsdp",), "lora_B": (None, "tensor"), "lora_magnitude_vector": ("tensor",)}),
    (pj.LoHaConfig(r=4, target_modules=["q_proj"]), "q_proj",
     {"hada_w1_a": (None, "tensor"), "hada_w1_b": ("fsdp",), "hada_w2_a": (None, "tensor"),
      "hada_w2_b": ("fsdp",)}),
    (pj.LoKrConfig(r=4, target_modules=["q_proj"]), "q_proj", "replicated"),
    (pj.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]), "q_proj",
     {"oft_R": ("fsdp",)}),
    (pj.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
     "q_proj", {"ia3_l": ("tensor",)}),
    (pj.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
     "down_proj", {"ia3_l": ("fsdp",)}),
    (pj.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["v_proj"]), "v_proj",
     {"lora_A": ("fsdp",), "lora_E": (), "lora_B": (None, "tensor")}),
    (pj.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]), "v_proj",
     {"vera_lambda_b": ("tensor",), "vera_lambda_d": ()}),
]  # fmt: skip


@pytest.mark.parametrize("cfg,module,want", RULES, ids=lambda x: getattr(x, "peft_type", None))
def test_adapters_follow_the_base_sharding(cfg, module, want, mesh):
    params = on_mesh(make_llama(), mesh)
    snap = snapshot(params)
    out = pj.inject(params, cfg, key=KEY)
    assert_unchanged(snap, params)
    where = ATTN if module.endswith(("q_proj", "v_proj")) else MLP
    n = node(out, f"{where}.{module}.kernel")
    got = specs_of(n)
    if want == "replicated":
        assert got and all(s == () for s in got.values()), got
    else:
        assert {k: got[k] for k in want} == want
    for a in n.arrays["default"].values():  # every array on the base's mesh
        assert a.sharding.mesh == mesh
    assert n.base.sharding.spec == P("fsdp", "tensor")
    # the pure helper gives the same shardings from the base specs, on the abstract tree
    abstract = jax.eval_shape(lambda p: pj.inject(p, cfg, key=0), make_llama())
    sh = pj.shardings(abstract, base_specs(make_llama()), mesh=mesh)
    want_sh = jax.tree.map(lambda x: x.sharding, out)
    flat_a, _ = jax.tree_util.tree_flatten_with_path(sh)
    flat_b, _ = jax.tree_util.tree_flatten_with_path(want_sh)
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (kp, a), (_, b) in zip(flat_a, flat_b):
        assert norm(a.spec) == norm(b.spec), jax.tree_util.keystr(kp)


def test_vera_shared_projections_are_replicated(mesh):
    out = pj.inject(
        on_mesh(make_llama(), mesh), pj.VeraConfig(r=4, target_modules=["q_proj"]), key=0
    )
    holder = [
        n
        for n in jax.tree.leaves(out, is_leaf=pj.node.is_adapted)
        if isinstance(n, pj.Adapted) and "vera_A" in n.arrays["default"]
    ]
    assert len(holder) == 1
    for k in ("vera_A", "vera_B"):
        assert norm(holder[0].arrays["default"][k].sharding.spec) == ()


def test_flattened_view_axes_and_conv_and_copies(mesh):
    # DenseGeneral (16, 2, 4): the output view axis flattens (heads, head_dim); sharding on the
    # leading heads axis carries over, sharding on head_dim alone cannot
    for spec, want_b in [
        (P("fsdp", "tensor", None), (None, "tensor")),
        (P("fsdp", None, "tensor"), ()),
    ]:
        w = jax.device_put(jnp.ones((16, 2, 4)), NamedSharding(mesh, spec))
        p = pj.inject(
            {"attn": {"query": {"kernel": w}}},
            pj.LoraConfig(r=2, target_modules=["query"]),
            key=0,
            layouts={"query": pj.Layout("dense")},
        )
        got = specs_of(p["attn"]["query"]["kernel"])
        assert got == {"lora_A": ("fsdp",), "lora_B": want_b}
    # a conv kernel (3, 3, 4, 8) sharded on its channels: A (3, 3, 4, r) keeps the kernel's
    # spatial and input axes
    w = jax.device_put(jnp.ones((3, 3, 4, 8)), NamedSharding(mesh, P(None, None, "fsdp", "tensor")))
    p = pj.inject({"conv": {"kernel": w}}, pj.LoraConfig(r=2, target_modules=["conv"]), key=0)
    assert specs_of(p["conv"]["kernel"]) == {
        "lora_A": (None, None, "fsdp"),
        "lora_B": (None, "tensor"),
    }
    # modules_to_save / LN tuning copies keep the leaf's own sharding
    params = on_mesh(make_llama(), mesh)
    cfg = pj.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    out = pj.inject(params, cfg, key=0)
    assert specs_of(out["params"]["lm_head"]["kernel"]) == {"weight": ("fsdp", "tensor")}


@pytest.mark.slow
def test_stacked_kernels_keep_their_layer_axis_sharding(mesh):
    w = jax.device_put(
        jax.random.normal(KEY, (4, 16, 8)), NamedSharding(mesh, P("data", "fsdp", "tensor"))
    )
    lay = {"proj": pj.Layout("dense", stack=1)}
    p = pj.inject(
        {"proj": {"kernel": w}}, pj.LoraConfig(r=2, target_modules=["proj"]), key=0, layouts=lay
    )
    assert specs_of(p["proj"]["kernel"]) == {
        "lora_A": ("data", "fsdp"),
        "lora_B": ("data", None, "tensor"),
    }
    # compact storage (layers_to_transform): one axis of the 2 stored layers, still split
    cfg = pj.LoraConfig(r=2, target_modules=["proj"], layers_to_transform=[1, 3])
    p = pj.inject({"proj": {"kernel": w}}, cfg, key=0, layouts=lay)
    assert specs_of(p["proj"]["kernel"]) == {
        "lora_A": ("data", "fsdp"),
        "lora_B": ("data", None, "tensor"),
    }
    # 3 stored layers: the data axis (2) cannot split them; replicated on that axis
    cfg = pj.LoraConfig(r=2, target_modules=["proj"], layers_to_transform=[0, 1, 3])
    p = pj.inject({"proj": {"kernel": w}}, cfg, key=0, layouts=lay)
    assert specs_of(p["proj"]["kernel"]) == {
        "lora_A": (None, "fsdp"),
        "lora_B": (None, None, "tensor"),
    }


def test_rank_axis(mesh):
    params = make_llama()
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj"])
    abstract = pj.inject(jax.eval_shape(lambda: params), cfg, key=0)
    sh = pj.shardings(abstract, base_specs(params), mesh=mesh, rank_axis="data")
    n = node(sh, f"{ATTN}.q_proj.kernel")
    assert norm(n.arrays["default"]["lora_A"].spec) == ("fsdp", "data")
    assert norm(n.arrays["default"]["lora_B"].spec) == ("data", "tensor")
    cfg3 = pj.LoraConfig(r=3, target_modules=["q_proj"])
    abstract = pj.inject(jax.eval_shape(lambda: params), cfg3, key=0)
    with pytest.raises(pj.ShardingError, match=r"model\.layers\.0\.self_attn\.q_proj.*rank"):
        pj.shardings(abstract, base_specs(params), mesh=mesh, rank_axis="data")
    with pytest.raises(pj.ShardingError, match="rank_axis='pipe'"):
        pj.shardings(abstract, base_specs(params), mesh=mesh, rank_axis="pipe")


# --------------------------------------------------------------------------------- bad input


def test_bad_sharding_trees_name_the_path(mesh):
    params = make_llama()
    abstract = pj.inject(
        jax.eval_shape(lambda: params), pj.LoraConfig(r=2, target_modules=["q_proj"]), key=0
    )
    specs = base_specs(params)
    del specs["params"]["lm_head"]
    with pytest.raises(pj.ShardingError, match=r"no sharding for \['lm_head\.kernel'\]"):
        pj.shardings(abstract, specs, mesh=mesh)
    specs = base_specs(params)
    specs["params"]["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"] = P("fsdp", "model")
    with pytest.raises(
        pj.ShardingError, match=r"model\.layers\.1\.self_attn\.q_proj\.kernel.*'model'"
    ):
        pj.shardings(abstract, specs, mesh=mesh)
    specs = base_specs(params)
    specs["params"]["lm_head"]["kernel"] = P("fsdp", "tensor", None)
    with pytest.raises(pj.ShardingError, match=r"lm_head\.kernel.*3 entries"):
        pj.shardings(abstract, specs, mesh=mesh)
    with pytest.raises(pj.ShardingError, match="pass `mesh=`"):
        pj.shardings(abstract, base_specs(params))
    with pytest.raises(pj.ShardingError, match="has no sharding"):
        pj.shardings(abstract)  # abstract leaves without sharding, and no base


# ---------------------------------------------------------------- sharded init and jit(inject)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = lambda n, f, axes: nn.Dense(  # noqa: E731
            f, use_bias=False, name=n,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        )  # fmt: skip
        h = dense("q_proj", 16, ("embed", "heads"))(x)
        h = dense("o_proj", 16, ("heads", "embed"))(jax.nn.silu(h))
        return x + h


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
            (32, 16),
        )
        x = emb[ids]
        x = Block(name="block0")(x)
        x = Block(name="block1")(x)
        return x @ emb.T


RULES_LOGICAL = (("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"))


@pytest.mark.slow
def test_sharded_init_never_whole_on_one_device(mesh):
    """``jax.eval_shape`` of a linen model with logical axes, `pj.shardings` of the injected
    abstract tree, then one jitted init + inject that materialises every array sharded."""
    model = Tiny()
    ids = jnp.zeros((2, 8), jnp.int32)
    boxed = jax.eval_shape(model.init, KEY, ids)  # nothing is allocated
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj", "o_proj"])
    abstract = pj.inject(nn.unbox(boxed), cfg, key=0)
    sh = pj.shardings(abstract, boxed, mesh=mesh, rules=RULES_LOGICAL)
    init = jax.jit(lambda k: pj.inject(nn.unbox(model.init(k, ids)), cfg, key=k), out_shardings=sh)
    params = init(KEY)
    q = params["params"]["block0"]["q_proj"]["kernel"]
    assert q.base.sharding.spec == P("fsdp", "tensor")
    assert q.base.addressable_shards[0].data.shape == (8, 8)  # a quarter of (16, 16) per device
    assert specs_of(q) == {"lora_A": ("fsdp",), "lora_B": (None, "tensor")}
    o = params["params"]["block1"]["o_proj"]["kernel"]
    assert specs_of(o) == {"lora_A": ("tensor",), "lora_B": (None, "fsdp")}
    # the same values as an eager init + inject on one device
    eager = pj.inject(nn.unbox(model.init(KEY, ids)), cfg, key=KEY)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    # inject on ShapeDtypeStructs that carry shardings gives the rule's shardings too
    carried = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES_LOGICAL),
    )
    ab2 = pj.inject(carried, cfg, key=0)
    for got in (jax.tree.map(lambda x: x.sharding, ab2), pj.shardings(ab2)):
        assert jax.tree.structure(got) == jax.tree.structure(sh)
        assert all(map(same, jax.tree.leaves(got), jax.tree.leaves(sh)))


def test_nnx_sharding_metadata(mesh):
    import flax.nnx as nnx

    class M(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "heads"))
            self.q = nnx.Linear(16, 8, kernel_init=init, use_bias=False, rngs=rngs)

    with nnx.use_eager_sharding(False):
        _, state = nnx.split(nnx.eval_shape(lambda: M(nnx.Rngs(0))))
    abstract = pj.inject(state, pj.LoraConfig(r=2, target_modules=["q"]), key=0)
    sh = pj.shardings(abstract, state, mesh=mesh, rules=RULES_LOGICAL)
    n = jax.tree.leaves(sh, is_leaf=lambda x: isinstance(x, pj.Adapted))[0]
    assert n.base.spec == P("fsdp", "tensor")
    assert norm(n.arrays["default"]["lora_A"].spec) == ("fsdp",)
    assert norm(n.arrays["default"]["lora_B"].spec) == (None, "tensor")


# --------------------------------------------------------------------------------- merging


def merge_hlo_gathers(fn, params) -> list[tuple[int, ...]]:
    return all_gathers(jax.jit(fn).lower(params).compile().as_text())


def all_gathers(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of the all-gathers in an HLO module."""
    out = []
    for m in re.finditer(r"=\s*\w+\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(", hlo):
        out.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        pj.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True),
        pj.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False),
    ],
    ids=["dora", "loha"],
)
def test_merge_on_the_mesh_keeps_shardings(cfg, mesh):
    single = pj.inject(make_llama(), cfg, key=KEY)
    single = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[-1] == 4 else x, single)
    sharded = jax.device_put(single, pj.shardings(single, base_specs(make_llama()), mesh=mesh))
    want = pj.merge(single)
    for fn in (pj.merge, lambda p: pj.unmerge(pj.merge(p))):
        got = fn(sharded)  # every leaf (DoRA's merge-time norm included) where the rule says
        rule = pj.shardings(got, base_specs(make_llama()), mesh=mesh)
        assert jax.tree.structure(rule) == jax.tree.structure(got)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(rule)):
            assert same(a.sharding, b), (a.shape, a.sharding, b)
    got = pj.merge(sharded)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    plain = pj.merge_and_unload(sharded)
    for a, s in zip(jax.tree.leaves(plain), jax.tree.leaves(base_specs(make_llama()))):
        assert norm(a.sharding.spec) == norm(s)
    # no full kernel is gathered onto a device by the merge
    kernel_shapes = {x.shape for x in jax.tree.leaves(make_llama()) if x.ndim == 2}
    assert not kernel_shapes & set(merge_hlo_gathers(pj.merge_and_unload, sharded))


def test_in_place_merge_with_donation(mesh):
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    params = pj.inject(on_mesh(make_llama(), mesh), cfg, key=KEY)
    want = jax.tree.map(lambda x: (np.array(x), x.sharding), pj.merge(params))
    got = jax.jit(pj.merge, donate_argnums=0)(params)
    q = node(params, f"{ATTN}.q_proj.kernel").base
    assert q.is_deleted()  # the buffers were donated: the merge ran in place
    flat_want = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))
    for a, (b, sh) in zip(jax.tree.leaves(got), flat_want):
        assert same(a.sharding, sh)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- training on the mesh


@pytest.fixture(scope="module")
def flax_llama():
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((FIX / "llama_lora" / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)
    params = jax.jit(lambda k: model.init_weights(k, (1, 8)))(jax.random.key(1))
    return model, params


def llama_specs(params):
    return base_specs(params)


def train_step(model, opt):
    def loss(tr, fr, ids):
        logits = pj.apply(lambda p, x: model(x, params=p).logits)(pj.combine(tr, fr), ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(tr, st, fr, ids):
        l, g = jax.value_and_grad(loss)(tr, fr, ids)
        u, st = opt.update(g, st, tr)
        return optax.apply_updates(tr, u), st, l

    return step


def run_steps(model, params, ids, n=2):
    opt = optax.adam(1e-2)
    tr, fr = pj.partition(params)
    st = opt.init(tr)
    step = jax.jit(train_step(model, opt))
    losses = []
    for _ in range(n):
        tr, st, l = step(tr, st, fr, ids)
        losses.append(float(l))
    return tr, losses, step, st, fr


IDS = (np.arange(32).reshape(4, 8) * 7) % 64


@pytest.mark.slow
@pytest.mark.parametrize(
    "cfg",
    [
        pj.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        pj.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
        pj.LoHaConfig(r=4, target_modules=["k_proj", "gate_proj"]),
    ],
    ids=["lora", "dora", "loha"],
)
def test_train_step_on_the_mesh_matches_one_device(cfg, flax_llama, mesh):
    model, base = flax_llama
    single = pj.inject(base, cfg, key=KEY)
    tr1, l1, *_ = run_steps(model, single, jnp.asarray(IDS))
    sharded = pj.inject(on_mesh(base, mesh), cfg, key=KEY)
    ids = jax.device_put(jnp.asarray(IDS), NamedSharding(mesh, P("data")))
    tr8, l8, step, st, fr = run_steps(model, sharded, ids)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l8[1] < l8[0]
    for a, b in zip(jax.tree.leaves(tr8), jax.tree.leaves(tr1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # the updated adapters keep the rule's shardings
    for a, b in zip(jax.tree.leaves(tr8), jax.tree.leaves(pj.partition(sharded)[0])):
        assert norm(a.sharding.spec) == norm(b.sharding.spec)


@pytest.mark.slow
def test_lora_step_gathers_no_base_weight_the_base_step_does_not(flax_llama, mesh):
    """Compare the collectives of the compiled sharded LoRA step with the base model's own
    sharded (full fine-tune) step: the adapted step all-gathers no extra full base weight."""
    model, base = flax_llama
    base = on_mesh(base, mesh)
    ids = jax.device_put(jnp.asarray(IDS), NamedSharding(mesh, P("data")))
    opt = optax.sgd(1e-2)

    def base_step(p, ids):
        def loss(p):
            logits = model(ids, params=p).logits
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], ids[:, 1:]
            ).mean()

        g = jax.grad(loss)(p)
        return optax.apply_updates(p, opt.update(g, opt.init(p), p)[0])

    cfg = pj.LoraConfig(r=4, target_modules="all-linear")
    params = pj.inject(base, cfg, key=KEY)
    tr, fr = pj.partition(params)
    lora = jax.jit(train_step(model, opt)).lower(tr, opt.init(tr), fr, ids).compile().as_text()
    full = jax.jit(base_step).lower(base, ids).compile().as_text()
    kernels = [x for x in jax.tree.leaves(base) if x.ndim == 2]
    weights = {x.shape for x in kernels} | {x.shape[::-1] for x in kernels}
    lg = Counter(s for s in all_gathers(lora) if s in weights)
    bg = Counter(s for s in all_gathers(full) if s in weights)
    assert all(lg[s] <= bg[s] for s in lg), (lg, bg)
    # and the adapted step moves no more gathered data than the full fine-tune step
    assert sum(map(math.prod, all_gathers(lora))) <= sum(map(math.prod, all_gathers(full)))
    # the HLO scan does find a gathered weight where there is one
    w = kernels[0]
    gather = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P()))
    assert w.shape in all_gathers(gather.lower(w).compile().as_text())


@pytest.mark.slow
def test_scanned_layer_model_on_the_mesh(mesh):
    """A scanned (``nn.scan``) Llama-style stack: stacked kernels (L, in, out) sharded on in /
    out; LoRA follows with the layer axis; one step equals the single-device step."""

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.Dense(32, use_bias=False, name="q_proj")(x)
            h = nn.Dense(16, use_bias=False, name="o_proj")(jax.nn.silu(h))
            return x + h, None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=3)  # fmt: skip
            return stack(name="layers")(x, None)[0]

    net = Net()
    x = jax.random.normal(KEY, (4, 16))
    base = net.init(KEY, x)
    specs = jax.tree.map(lambda a: P(None, "fsdp", "tensor"), base)
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False)
    lay = pj.Layout("dense", stack=1)
    opt = optax.adam(1e-2)

    def run(params, xb):
        tr, fr = pj.partition(params)

        def loss(tr):
            return jnp.mean(pj.apply(net.apply)(pj.combine(tr, fr), xb) ** 2)

        l, g = jax.jit(jax.value_and_grad(loss))(tr)
        u, _ = opt.update(g, opt.init(tr), tr)
        return float(l), optax.apply_updates(tr, u)

    l1, t1 = run(pj.inject(base, cfg, key=KEY, layouts=lay), x)
    sharded = jax.device_put(base, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    p8 = pj.inject(sharded, cfg, key=KEY, layouts=lay)
    q = p8["params"]["layers"]["q_proj"]["kernel"]
    assert specs_of(q) == {"lora_A": (None, "fsdp"), "lora_B": (None, None, "tensor")}
    l8, t8 = run(p8, jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(t8), jax.tree.leaves(t1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ files and checkpoints


@pytest.mark.slow
def test_load_pretrained_on_a_sharded_base(flax_llama, mesh):
    from safetensors.numpy import load_file

    from tests.test_io import flax_from_torch

    base = flax_from_torch(load_file(str(FIX / "llama_lora" / "base.safetensors")))
    base = {"model": base["model"], "lm_head": base["lm_head"]} if "lm_head" in base else base
    sharded = on_mesh(base, mesh)
    loaded = pj.load_pretrained(sharded, FIX / "llama_lora")
    n = node(loaded, "model.layers.0.self_attn.q_proj.kernel")
    assert specs_of(n) == {"lora_A": ("fsdp",), "lora_B": (None, "tensor")}
    single = pj.load_pretrained(base, FIX / "llama_lora")
    for a, b in zip(
        jax.tree.leaves(pj.merge_and_unload(loaded)), jax.tree.leaves(pj.merge_and_unload(single))
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_shape(tmp_path, mesh):
    cfg = pj.LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    params = pj.inject(on_mesh(make_llama(), mesh), cfg, key=KEY)
    with pj.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(3, params)
    other = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
    target = pj.inject(on_mesh(make_llama(), other), cfg, key=jax.random.key(9))
    with pj.AdapterCheckpointer(tmp_path / "ck") as ck:
        got = ck.restore(target)[0]
    for path in (f"{ATTN}.q_proj.kernel", f"{MLP}.down_proj.kernel"):
        a, b = node(got, path), node(params, path)
        for k in ("lora_A", "lora_B"):
            np.testing.assert_array_equal(
                np.asarray(a.arrays["default"][k]), np.asarray(b.arrays["default"][k])
            )
            assert a.arrays["default"][k].sharding.mesh == other
        assert a.arrays["default"]["lora_A"].sharding.spec == P("fsdp", None)
        assert (
            a.arrays["default"]["lora_A"].addressable_shards[0].data.shape[0]
            == a.base.shape[0] // 4
        )


def test_a_committed_single_device_base_keeps_its_adapters_beside_it():
    dev = jax.devices()[3]
    base = jax.device_put(make_llama(), dev)
    out = pj.inject(base, pj.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), key=0)
    n = node(out, f"{ATTN}.q_proj.kernel")
    assert all(a.devices() == {dev} for a in n.arrays["default"].values())
    merged = pj.merge_and_unload(out)  # and the merge runs there without a device mismatch
    assert node(merged, f"{ATTN}.q_proj.kernel").devices() == {dev}


def test_explicit_axes_mesh():
    """jax's Explicit sharding mode (``jax.make_mesh``'s default): the adapters follow, and a
    model that states its output sharding runs adapted under ``jax.set_mesh``."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    x = jax.device_put(jax.random.normal(KEY, (4, 16)), NamedSharding(mesh, P("data")))
    w = jax.device_put(jax.random.normal(KEY, (16, 8)), NamedSharding(mesh, P("model", None)))
    cfg = pj.LoraConfig(r=2, target_modules=["q"], init_lora_weights=False)
    p = pj.inject({"q": {"kernel": w}}, cfg, key=0)
    assert specs_of(p["q"]["kernel"]) == {"lora_A": ("model",), "lora_B": ()}
    # under jax.jit too: an Explicit-axes tracer carries its sharding, and inject follows it
    jitted = jax.jit(lambda b: pj.inject(b, cfg, key=0))({"q": {"kernel": w}})
    assert specs_of(jitted["q"]["kernel"]) == {"lora_A": ("model",), "lora_B": ()}

    def f(p, x):
        return jnp.einsum("bi,io->bo", x, p["q"]["kernel"], out_sharding=P("data", None))

    with jax.set_mesh(mesh):
        y = jax.jit(pj.apply(f))(p, x)
        want = f(pj.merge_and_unload(p), x)
    assert norm(y.sharding.spec) == ("data",)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)
