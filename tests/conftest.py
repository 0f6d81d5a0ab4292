"""Shared fixtures: small params trees of every shape family peftjax adapts.

Every fixture returns a *fresh* tree (function scope) so a test may keep it as a reference.
Dimensions are tiny so that the whole suite runs in seconds on a CPU.

* ``llama``: a Llama-shaped linen variable dict (hidden 16, intermediate 24, vocab 32, 3
  layers, k/v out 8)::

      {"params": {"model": {"embed_tokens": {"embedding"}, "layers": {"0": {"self_attn":
       {"q_proj", "k_proj", "v_proj", "o_proj"}, "mlp": {"gate_proj", "up_proj", "down_proj"},
       "input_layernorm": {"weight"}, "post_attention_layernorm": {"weight"}}, ...},
       "norm": {"weight"}}, "lm_head": {"kernel"}}}

* ``mlp``: two biased Dense layers ``fc1 (12 -> 20)``, ``fc2 (20 -> 12)``.
* ``dense_general``: DenseGeneral kernels ``attn.query (16, 2, 4)`` (``n_in=1``, with a
  ``(2, 4)`` bias) and ``attn.out (2, 4, 16)`` (``n_in=2``); see `DENSE_GENERAL_LAYOUTS`.
* ``conv``: Flax conv kernels ``conv1 (3, 3, 4, 8)`` and ``conv2 (1, 1, 8, 6)``, with biases.
* ``stacked``: scanned layers with a leading layer axis ``L = 3``: ``layers.self_attn.q_proj
  (3, 16, 16)`` with a ``(3, 16)`` bias, ``layers.self_attn.v_proj (3, 16, 8)``,
  ``layers.mlp.down_proj (3, 24, 16)``, ``layers.input_layernorm.weight (3, 16)``, a linen
  LayerNorm ``layers.final_ln.{scale, bias} (3, 16)`` and an unstacked ``embed``; read with
  ``pj.Layout("dense", stack=1)``.
* ``nnx_state``: the ``State`` of a tiny ``flax.nnx`` model (embed, 2 blocks of q/v Linear and
  a LayerNorm, a head), with its ``graphdef`` (fixture ``nnx_model``).
* ``make_tree(name, seed=None, dtype=...)``: any family of `TREES` by name (``"nnx"`` included).

Plain helpers (import them from ``tests.conftest``): `snapshot` / `assert_unchanged` (deep
copy of a tree and bit-exact comparison, adapter metadata included), `assert_trees_equal`,
`assert_trees_close`, `nodes`, `weight_nodes` (``{module path: Adapted}``), `leaf_names` (a
tree path as ``[*module path, leaf]``) and `randomize` (every adapter array replaced by random
values).
"""

from __future__ import annotations

import os

# 8 simulated CPU devices for the mesh tests (tests/test_sharding.py), set before jax starts;
# single-device tests are unaffected (arrays live on device 0 unless put elsewhere).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj

HIDDEN, INTER, VOCAB, N_LAYERS, KV_OUT = 16, 24, 32, 3, 8
STACK = 3

DENSE_GENERAL_LAYOUTS = {
    "query": pj.Layout("dense", n_in=1),
    "out": pj.Layout("dense", n_in=2),
}
STACKED_LAYOUT = pj.Layout("dense", stack=1)


def _rand(rng: np.random.Generator, shape, scale=0.5, dtype=jnp.float32):
    return jnp.asarray(rng.normal(0.0, scale, shape).astype(np.float32), dtype)


def make_llama(seed: int = 0, dtype=jnp.float32, n_layers: int = N_LAYERS):
    rng = np.random.default_rng(seed)
    r = lambda *s: _rand(rng, s, dtype=dtype)  # noqa: E731
    ones = lambda n: jnp.asarray(1.0 + 0.1 * rng.normal(size=n).astype(np.float32), dtype)  # noqa: E731
    layers = {}
    for i in range(n_layers):
        layers[str(i)] = {
            "self_attn": {
                "q_proj": {"kernel": r(HIDDEN, HIDDEN)},
                "k_proj": {"kernel": r(HIDDEN, KV_OUT)},
                "v_proj": {"kernel": r(HIDDEN, KV_OUT)},
                "o_proj": {"kernel": r(HIDDEN, HIDDEN)},
            },
            "mlp": {
                "gate_proj": {"kernel": r(HIDDEN, INTER)},
                "up_proj": {"kernel": r(HIDDEN, INTER)},
                "down_proj": {"kernel": r(INTER, HIDDEN)},
            },
            "input_layernorm": {"weight": ones(HIDDEN)},
            "post_attention_layernorm": {"weight": ones(HIDDEN)},
        }
    return {
        "params": {
            "model": {
                "embed_tokens": {"embedding": r(VOCAB, HIDDEN)},
                "layers": layers,
                "norm": {"weight": ones(HIDDEN)},
            },
            "lm_head": {"kernel": r(HIDDEN, VOCAB)},
        }
    }


def make_mlp(seed: int = 1, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: _rand(rng, s, dtype=dtype)  # noqa: E731
    return {
        "params": {
            "fc1": {"kernel": r(12, 20), "bias": r(20)},
            "fc2": {"kernel": r(20, 12), "bias": r(12)},
        }
    }


def make_dense_general(seed: int = 2, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: _rand(rng, s, dtype=dtype)  # noqa: E731
    return {
        "params": {
            "attn": {
                "query": {"kernel": r(HIDDEN, 2, 4), "bias": r(2, 4)},
                "out": {"kernel": r(2, 4, HIDDEN)},
            }
        }
    }


def make_conv(seed: int = 3, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: _rand(rng, s, dtype=dtype)  # noqa: E731
    return {
        "params": {
            "conv1": {"kernel": r(3, 3, 4, 8), "bias": r(8)},
            "conv2": {"kernel": r(1, 1, 8, 6), "bias": r(6)},
        }
    }


def make_stacked(seed: int = 4, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: _rand(rng, s, dtype=dtype)  # noqa: E731
    return {
        "params": {
            "layers": {
                "self_attn": {
                    "q_proj": {"kernel": r(STACK, HIDDEN, HIDDEN), "bias": r(STACK, HIDDEN)},
                    "v_proj": {"kernel": r(STACK, HIDDEN, KV_OUT)},
                },
                "mlp": {"down_proj": {"kernel": r(STACK, INTER, HIDDEN)}},
                "input_layernorm": {"weight": 1.0 + r(STACK, HIDDEN) * 0.1},
                "final_ln": {"scale": 1.0 + r(STACK, HIDDEN) * 0.1, "bias": r(STACK, HIDDEN)},
            },
            "embed": {"embedding": r(VOCAB, HIDDEN)},
        }
    }


def make_gpt2(n_embd: int = 32, n_head: int = 4, n_layer: int = 1, vocab: int = 64, seed: int = 0):
    """``(model, params)``: transformers' FlaxGPT2LMHeadModel from a tiny config, random weights
    (N(0, 0.2)); its Conv1D kernels are stored ``(out, in)``."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=n_head
    )
    gm = transformers.FlaxGPT2LMHeadModel(cfg, _do_init=False)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape).astype(np.float32)),
        gm.params_shape_tree,
    )
    return gm, params


def tiny_llama_config(layers: int = 2, **kw):
    """transformers' ``LlamaConfig`` of the suite's tiny FlaxLlama: vocab 64, hidden 32,
    intermediate 64, 4 query / 2 KV heads, 64 positions (``kw`` overrides)."""
    import transformers

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**base, **kw})


def random_model_params(shapes, seed: int = 0):
    """Random float32 params of a model's param shapes (N(0, 0.1); norm weights 1 + N(0, 0.1)):
    with ``_do_init=False``, a random model without compiling its init."""
    rng = np.random.default_rng(seed)

    def leaf(path, sd):
        x = 0.1 * rng.standard_normal(sd.shape)
        if jax.tree_util.keystr(path).endswith("['weight']"):  # RMSNorm scales
            x = x + 1.0
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def make_hf_llama(layers: int = 2, seed: int = 0, **kw):
    """``(model, params)``: a tiny transformers ``FlaxLlamaForCausalLM`` (`tiny_llama_config`)
    with `random_model_params`."""
    import transformers

    cfg = tiny_llama_config(layers, **kw)
    model = transformers.FlaxLlamaForCausalLM(cfg, seed=0, _do_init=False)
    return model, random_model_params(model.params_shape_tree, seed)


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def dense_general():
    return make_dense_general()


@pytest.fixture
def conv():
    return make_conv()


@pytest.fixture
def stacked():
    return make_stacked()


def _nnx_model():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.q_proj = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
            self.v_proj = nnx.Linear(HIDDEN, KV_OUT, rngs=rngs)
            self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(VOCAB, HIDDEN, rngs=rngs)
            blocks = [Block(rngs) for _ in range(2)]
            self.layers = nnx.List(blocks) if hasattr(nnx, "List") else blocks
            self.head = nnx.Linear(HIDDEN, VOCAB, rngs=rngs)

    return Model(nnx.Rngs(0))


def make_nnx(seed: int = 5, dtype=jnp.float32):
    """``(graphdef, state)`` of a tiny nnx model. Built abstractly (``nnx.eval_shape``, no XLA
    compilation of the initialisers) and filled with seeded random values."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(_nnx_model))
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape).astype(np.float32), dtype), state
    )
    return graphdef, state


def make_nnx_state(seed: int = 5, dtype=jnp.float32):
    return make_nnx(seed, dtype)[1]


TREES = {
    "llama": make_llama,
    "mlp": make_mlp,
    "dense_general": make_dense_general,
    "conv": make_conv,
    "stacked": make_stacked,
    "nnx": make_nnx_state,
}


@pytest.fixture
def make_tree():
    """``make_tree(name, seed=None, dtype=jnp.float32)``: a fresh tree of a family in `TREES`."""

    def make(name: str, seed: int | None = None, dtype=jnp.float32):
        fn = TREES[name]
        return fn(dtype=dtype) if seed is None else fn(seed=seed, dtype=dtype)

    return make


@pytest.fixture
def nnx_model():
    """``(graphdef, state)`` of a tiny nnx model."""
    return make_nnx()


@pytest.fixture
def nnx_state(nnx_model):
    return nnx_model[1]


# ------------------------------------------------------------------------------ helpers


def snapshot(tree):
    """A deep copy of ``tree``: its structure (adapter metadata included) and every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(np.array(x, copy=True), np.asarray(x).dtype) for x in leaves]


def assert_unchanged(before, tree):
    """``tree`` still matches the `snapshot` ``before``, bit for bit."""
    treedef, leaves = before
    now_leaves, now_def = jax.tree_util.tree_flatten(tree)
    assert now_def == treedef, f"the input's structure changed:\n{treedef}\n{now_def}"
    for (x, dt), y in zip(leaves, now_leaves, strict=True):
        assert np.asarray(y).dtype == dt
        np.testing.assert_array_equal(np.asarray(y), x)


def assert_trees_equal(a, b):
    """Same structure and bit-identical leaves (dtype included)."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"structures differ:\n{ta}\n{tb}"
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, x.dtype, y.shape, y.dtype)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"structures differ:\n{ta}\n{tb}"
    for x, y in zip(la, lb, strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


# ------------------------------------------------------------------------------ adapter helpers


def is_adapted(x) -> bool:
    return isinstance(x, pj.Adapted)


def nodes(tree) -> list[pj.Adapted]:
    """Every `Adapted` node of ``tree``, in flattening order."""
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_adapted) if is_adapted(x)]


def _names(path) -> list[str]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return out


def leaf_names(path) -> list[str]:
    """A tree path as names, without linen's ``params`` collection and an nnx Variable's
    ``value``: ``[*module path, leaf name]``."""
    names = _names(path)
    if names and names[0] == "params":
        names = names[1:]
    if names and names[-1] == "value":
        names = names[:-1]
    return names


def weight_nodes(tree) -> dict[str, pj.Adapted]:
    """``{module path: node}`` of the adapted weight leaves (not IA3's bias markers)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapted)[0]:
        if is_adapted(x) and any(x.arrays[n] for n in x.names):
            names = _names(path)
            if names and names[0] == "params":
                names = names[1:]
            out[".".join(names[:-1])] = x
    return out


def randomize(q, seed: int = 0, names=None):
    """``q`` with every adapter array replaced by random values: IA3 vectors and DoRA magnitudes
    in U(0.5, 1.5), LN-tuning / modules_to_save copies perturbed by N(0, 0.3^2), OFT's ``oft_R``
    N(0, 0.1^2), everything else N(0, 0.3^2). Dtypes and shapes are kept. ``names``: only those
    adapters."""
    rng = np.random.default_rng(seed)

    def one(k, v):
        if k in ("ia3_l", "lora_magnitude_vector"):
            new = rng.uniform(0.5, 1.5, v.shape)
        elif k == "weight":  # a copy (LN tuning, modules_to_save)
            new = np.asarray(v, np.float32) + rng.normal(0.0, 0.3, v.shape)
        elif k == "oft_R":  # OFT's skew parameters: PEFT's random init, N(0, 0.1^2), keeps the
            # Neumann series near a rotation (at N(0, 0.3^2) it can be near-singular, and the
            # merge / unmerge round trip then amplifies rounding without bound)
            new = rng.normal(0.0, 0.1, v.shape)
        else:
            new = rng.normal(0.0, 0.3, v.shape)
        return jnp.asarray(new, v.dtype)

    def fix(x):
        if not is_adapted(x):
            return x
        arrays = {
            n: ({k: one(k, v) for k, v in a.items()} if names is None or n in names else a)
            for n, a in x.arrays.items()
        }
        return x.replace(arrays=arrays)

    return jax.tree_util.tree_map(fix, q, is_leaf=is_adapted)
