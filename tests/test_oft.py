"""OFT against HF PEFT 0.21.2: every PEFT-made OFT fixture loads, runs (`pj.apply`), merges,
unmerges and saves back bit for bit; the tiny Llama through transformers' Flax model; COFT
training with `pj.constrain` as PEFT trains; the block-size rule and its warning; the rotation
math against the NumPy oracles of ``tests/reference_more.py``; bad input.

The fixtures are described in ``tests/fixtures/peft/MANIFEST_MORE.md``. ``oft_conv3x3`` is
compared with ``y_correct`` (the conv with PEFT's merged kernel), not with PEFT's broken k > 1
forward (``y_adapted``), which peftjax deliberately does not reproduce.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax as pj
from peftjax import io as pio
from peftjax.methods.oft import OFTSpec, adjust_oft_parameters, coft_project
from tests import reference_more as rm
from tests.conftest import STACKED_LAYOUT, make_mlp, make_stacked
from tests.test_io import FIX, base_params, flax_from_torch, io_data

P = pio.PREFIX


def mlp(p, x):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def conv(p, x):
    """PEFT's Conv2d(padding=1) on NCHW input, with a Flax ``(kh, kw, in, out)`` kernel."""
    y = jax.lax.conv_general_dilated(
        jnp.transpose(x, (0, 2, 3, 1)),
        p["conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return jnp.transpose(y + p["conv"]["bias"], (0, 3, 1, 2))


def embed_head(p, ids):
    return jnp.take(p["emb"]["embedding"], ids, axis=0) @ p["head"]["kernel"] + p["head"]["bias"]


MLP_CASES = [
    "oft_linear",
    "oft_linear_neumann",
    "oft_block_share_coft",
    "oft_coft",
    "oft_r",
    "oft_block_size_moved",
]
# case: (forward, input key, expected output key)
CASES = {
    **{c: (mlp, "x", "y_adapted") for c in MLP_CASES},
    "oft_conv1x1": (conv, "x", "y_adapted"),
    "oft_conv3x3": (conv, "x", "y_correct"),  # PEFT's own k > 1 forward is wrong
    "oft_embedding": (embed_head, "ids", "y_adapted"),
}


def load(case, params=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oft_block_size_moved warns (tested below)
        return pio.load_pretrained(
            base_params(case) if params is None else params, FIX / case, **kw
        )


def leaves_close(got, want, atol):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (kp, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True
    ):
        assert a.shape == b.shape and a.dtype == b.dtype, kp
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5, err_msg=str(kp)
        )


# ---------------------------------------------------------------------------------- fixtures


#: fixtures of every kind in the default run (linear, both convs, embedding); the other
#: linear variants (COFT, Neumann, block sharing, ...) with -m slow
DEFAULT_FIXTURES = ("oft_linear", "oft_conv1x1", "oft_conv3x3", "oft_embedding")


@pytest.mark.parametrize(
    "case",
    [c if c in DEFAULT_FIXTURES else pytest.param(c, marks=pytest.mark.slow) for c in CASES],
)
def test_peft_fixture(case, tmp_path):
    fwd, inp, out = CASES[case]
    params = base_params(case)
    io = io_data(case)
    x = jnp.asarray(io[inp], jnp.int32 if inp == "ids" else jnp.float32)
    loaded = load(case, params)

    @jax.jit  # one compilation per case: the forward, the merge and the round trip
    def run(t, x):
        merged = pj.merge_and_unload(t)
        back = pj.unload(pj.unmerge(pj.merge(t)))
        return pj.apply(fwd)(t, x), merged, back

    y, merged, back = run(loaded, x)
    # the unmerged forward is PEFT's
    np.testing.assert_allclose(np.asarray(y), io[out], atol=2e-6, rtol=1e-5)
    if case == "oft_conv3x3":  # documented difference: PEFT's k > 1 forward is not its merge
        assert np.abs(np.asarray(y) - io["y_adapted"]).max() > 1.0
    # merge_and_unload gives PEFT's merged weights; merge / unmerge round-trips to the base
    leaves_close(merged, flax_from_torch(io, "merged."), atol=1e-6)
    leaves_close(back, params, atol=3e-7)
    # save_pretrained writes PEFT's file back: tensors bit for bit, the same config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = pio.save_pretrained(loaded, tmp_path)
    got, _ = pio.read_safetensors(saved / pio.WEIGHTS_NAME)
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    fixture_cfg = json.loads((FIX / case / pio.CONFIG_NAME).read_text())
    saved_cfg = json.loads((saved / pio.CONFIG_NAME).read_text())
    assert set(saved_cfg.pop("target_modules")) == set(fixture_cfg.pop("target_modules"))
    saved_cfg.pop("auto_mapping"), fixture_cfg.pop("auto_mapping")
    assert saved_cfg == fixture_cfg


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_llama_through_hf_flax_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    case = "llama_oft"
    cfg = json.loads((FIX / case / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)
    params, io = base_params(case), io_data(case)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    loaded = load(case, params)
    assert len(pj.targeted_modules(loaded)) == 8
    logits = lambda p, i: model(i, params=p).logits  # noqa: E731

    @jax.jit  # one compilation: the merged and the unmerged (`pj.apply`) forwards
    def run(t, i):
        return logits(pj.merge_and_unload(t), i), pj.apply(logits)(t, i)

    merged, fwd = run(loaded, ids)
    tol = dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(merged), io["logits_adapted"], **tol)
    np.testing.assert_allclose(np.asarray(fwd), io["logits_adapted"], **tol)
    saved = pio.save_pretrained(loaded, tmp_path)
    got, _ = pio.read_safetensors(saved / pio.WEIGHTS_NAME)
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_llama_stacked_layers(tmp_path):
    """The same file on scanned layers: one stacked adapter per projection, PEFT's per-layer
    keys and merged weights."""
    case = "llama_oft"
    flat = base_params(case)
    layers = flat["model"]["layers"]
    stacked = {
        **flat,
        "model": {
            **flat["model"],
            "layers": jax.tree_util.tree_map(lambda *x: jnp.stack(x), layers["0"], layers["1"]),
        },
    }
    lay = {r"model\.layers\..*": pj.Layout("dense", stack=1)}
    loaded = load(case, stacked, layouts=lay)
    node = loaded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.arrays["default"]["oft_R"].shape == (2, 4, 28)
    ml = pj.merge_and_unload(loaded)["model"]["layers"]
    want = flax_from_torch(io_data(case), "merged.")["model"]["layers"]
    for i in range(2):
        leaves_close(jax.tree_util.tree_map(lambda x, i=i: x[i], ml), want[str(i)], atol=1e-5)
    pio.save_pretrained(loaded, tmp_path)
    got, _ = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)
    want_t, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    assert sorted(got) == sorted(want_t)
    for k in want_t:
        np.testing.assert_array_equal(got[k], want_t[k], err_msg=k)


# ---------------------------------------------------------------------------------- forward rules


def _scanned(p, x):
    """A scanned stack of ``q_proj`` layers (``x (T, 16)``)."""

    def body(h, w):
        return jnp.tanh(h @ w["kernel"] + w["bias"]), None

    return jax.lax.scan(body, x, p["params"]["layers"]["self_attn"]["q_proj"])[0]


def test_stacked_scan_forward_equals_merge():
    """Scanned layers, layer 1 without adapter (compact arrays, expanded for the scan)."""
    p = make_stacked()
    cfg = pj.OFTConfig(oft_block_size=4, target_modules=["q_proj"], layers_to_transform=[0, 2])
    q = _perturb(pj.inject(p, cfg, key=1, layouts=STACKED_LAYOUT))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 16)), jnp.float32)
    y, ym = jax.jit(lambda q, x: (pj.apply(_scanned)(q, x), _scanned(pj.merge_and_unload(q), x)))(
        q, x
    )
    np.testing.assert_allclose(y, ym, atol=2e-6)
    assert np.abs(np.asarray(y) - np.asarray(_scanned(p, x))).max() > 1e-3
    node = q["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert node.arrays["default"]["oft_R"].shape == (2, 4, 6)


def _perturb(tree, scale=0.1, seed=0):
    rng = np.random.default_rng(seed)

    def node(x):
        if not isinstance(x, pj.Adapted):
            return x
        arrays = {
            n: {k: jnp.asarray(rng.normal(0, scale, v.shape), v.dtype) for k, v in a.items()}
            for n, a in x.arrays.items()
        }
        return x.replace(arrays=arrays)

    return jax.tree_util.tree_map(node, tree, is_leaf=pj.Adapted.__instancecheck__)


def test_rotation_direction_and_merge_orientation():
    """``y = (x R_bd) K`` and ``K' = R_bd K`` with R_bd from the NumPy oracle (one shared block,
    exact Cayley), bias not rotated; the gradient through `pj.apply` is the gradient through the
    merged weight, though training never builds ``R_bd K``."""
    p = make_mlp()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 12)), jnp.float32)
    cfg = pj.OFTConfig(
        oft_block_size=4, block_share=True, use_cayley_neumann=False, target_modules=["fc1"]
    )
    q = _perturb(pj.inject(p, cfg, key=0), scale=0.2)
    a0 = q["params"]["fc1"]["kernel"].arrays["default"]
    R = rm.oft_rotation(
        np.asarray(a0["oft_R"], np.float64), 12, block_share=True, use_cayley_neumann=False
    )
    K, b = np.asarray(p["params"]["fc1"]["kernel"], np.float64), p["params"]["fc1"]["bias"]

    def fc1(t, x):
        return x @ t["params"]["fc1"]["kernel"] + t["params"]["fc1"]["bias"]

    @jax.jit
    def run(a):
        def loss_fwd(a):
            return jnp.sum(jnp.sin(pj.apply(fc1)(_with(q, a), x)))

        def loss_merged(a):
            return jnp.sum(jnp.sin(fc1(pj.merge_and_unload(_with(q, a)), x)))

        t = _with(q, a)
        merged = pj.merge_and_unload(t)["params"]["fc1"]["kernel"]
        return pj.apply(fc1)(t, x), merged, jax.grad(loss_fwd)(a), jax.grad(loss_merged)(a)

    y, merged, g1, g2 = run(a0)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ R @ K + np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(merged, R @ K, atol=1e-5)
    np.testing.assert_allclose(g1["oft_R"], g2["oft_R"], atol=1e-5)


def _with(q, arrays, module="fc1"):
    node = q["params"][module]["kernel"]
    new = node.replace(arrays={**node.arrays, "default": arrays})
    return {"params": {**q["params"], module: {**q["params"][module], "kernel": new}}}


def test_neumann_series_and_cayley_blocks():
    rng = np.random.default_rng(2)
    v = rng.normal(0, 0.2, (3, 6))
    q = rm.skew_from_vec(v, 4)
    base = dict(layout=pj.Layout("dense"), shape=(12, 5), scaling=(1.0,), n_blocks=3, block_size=4)

    variants = {f"m{m}": dict(num_cayley_neumann_terms=m) for m in (1, 2, 3, 4, 5, 7, 12)}
    variants["exact"] = dict(use_cayley_neumann=False)

    @jax.jit  # every variant in one compilation
    def all_blocks(v):
        out = {k: OFTSpec(**base, **kw).blocks({"oft_R": v}, 1.0) for k, kw in variants.items()}
        out["off"] = OFTSpec(**base).blocks({"oft_R": v}, 0.0)
        out["small12"] = OFTSpec(**base, **variants["m12"]).blocks({"oft_R": v / 4}, 1.0)
        out["small_exact"] = OFTSpec(**base, **variants["exact"]).blocks({"oft_R": v / 4}, 1.0)
        return out

    got = {k: np.asarray(b, np.float64) for k, b in all_blocks(jnp.asarray(v, jnp.float32)).items()}
    eye = np.broadcast_to(np.eye(4), (3, 4, 4))
    for m in (1, 2, 3, 4, 5, 7):
        np.testing.assert_allclose(got[f"m{m}"], rm.cayley_neumann(q, m), atol=1e-6)
    np.testing.assert_array_equal(got["m3"], got["m4"])  # PEFT's quirk: 3 and 4 terms agree
    np.testing.assert_array_equal(got["m1"], eye)
    np.testing.assert_allclose(got["exact"], rm.cayley_exact(q), atol=1e-6)
    np.testing.assert_allclose(got["exact"] @ got["exact"].transpose(0, 2, 1), eye, atol=1e-6)
    # the two modes turn opposite ways: the series approximates exact^T (for a small Q)
    np.testing.assert_allclose(got["small12"], got["small_exact"].transpose(0, 2, 1), atol=1e-6)
    assert np.abs(got["small12"] - got["small_exact"]).max() > 1e-2
    # a layer that is off (scale 0) is the identity, whatever its parameters
    np.testing.assert_array_equal(got["off"], eye)


def test_several_adapters_rotate_in_merge_order():
    """Two active OFT adapters: dense ``x R_b R_a K`` (the order PEFT's merge folds them; PEFT's
    unmerged forward would give ``x R_a R_b W^T``, it disagrees with itself), embedding
    ``E R_a R_b`` (PEFT's forward and merge agree); `pj.apply` equals `merge_and_unload`."""
    rng = np.random.default_rng(3)
    p = {
        "fc": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
        "emb": {"embedding": jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)},
    }
    cfg = pj.OFTConfig(oft_block_size=4, target_modules=["fc", "emb"], init_weights=False)
    q = pj.inject(p, cfg, key=0, name="a")
    q = pj.set_active(pj.inject(q, cfg, key=1, name="b"), ["a", "b"])

    def rot(name, mod):
        node = q[mod][{"fc": "kernel", "emb": "embedding"}[mod]]
        v = np.asarray(node.arrays[name]["oft_R"], np.float64)
        return rm.oft_rotation(v, 8)

    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    ids = jnp.asarray([1, 4, 7], jnp.int32)
    f = lambda t, x, ids: (x @ t["fc"]["kernel"], jnp.take(t["emb"]["embedding"], ids, 0))  # noqa: E731

    @jax.jit
    def run(q):
        return (
            pj.apply(f)(q, x, ids),
            f(pj.merge_and_unload(q), x, ids),
            pj.unload(pj.unmerge(pj.merge(q))),
        )

    (y, e), (ym, em), back = run(q)
    np.testing.assert_allclose(y, ym, atol=1e-5)
    np.testing.assert_allclose(e, em, atol=1e-5)
    K, E = np.asarray(p["fc"]["kernel"]), np.asarray(p["emb"]["embedding"])
    np.testing.assert_allclose(y, np.asarray(x) @ rot("b", "fc") @ rot("a", "fc") @ K, atol=1e-5)
    np.testing.assert_allclose(e, E[np.asarray(ids)] @ rot("a", "emb") @ rot("b", "emb"), atol=1e-5)
    leaves_close(back, p, atol=1e-5)


def test_module_dropout_has_no_effect():
    p = make_mlp()
    cfg = pj.OFTConfig(oft_block_size=4, target_modules=["fc1", "fc2"], module_dropout=0.5)
    q = _perturb(pj.inject(p, cfg, key=0))
    x = jnp.ones((4, 12), jnp.float32)
    run = jax.jit(
        lambda q, k: (pj.apply(mlp, rng=k)(q["params"], x), pj.apply(mlp)(q["params"], x))
    )
    train, infer = run(q, jax.random.key(3))
    np.testing.assert_array_equal(train, infer)


def test_init():
    p = make_mlp()
    zero = pj.inject(p, pj.OFTConfig(oft_block_size=4, target_modules=["fc2"]), key=0)
    a = zero["params"]["fc2"]["kernel"].arrays["default"]["oft_R"]
    assert a.shape == (5, 6) and not np.any(np.asarray(a))
    cfg = pj.OFTConfig(r=1, oft_block_size=0, target_modules=["fc2"], init_weights=False)
    rnd = pj.inject(p, cfg, key=0)["params"]["fc2"]["kernel"].arrays["default"]["oft_R"]
    assert rnd.shape == (1, 190) and 0.08 < float(np.std(rnd)) < 0.12  # PEFT's N(0, 0.1^2)
    assert pj.count_parameters(pj.inject(p, cfg, key=0))[0] == 190


# ---------------------------------------------------------------------------------- COFT


def test_coft_raw_params_project_in_forward_and_save(tmp_path):
    """From the pre-projection values PEFT started with, the forward projects first (PEFT's
    ``y_adapted``) and save_pretrained writes the projected values PEFT saved."""
    case = "oft_coft"
    io = io_data(case)
    loaded = load(case)
    tree = loaded
    for m in ("fc1", "fc2"):
        tree = _with_flat(tree, m, jnp.asarray(io[f"raw.{P}{m}.oft_R.weight"]))
    y = jax.jit(pj.apply(mlp))(tree, jnp.asarray(io["x"]))
    np.testing.assert_allclose(y, io["y_adapted"], atol=2e-6)
    pio.save_pretrained(tree, tmp_path)
    got, _ = pio.read_safetensors(tmp_path / pio.WEIGHTS_NAME)
    want, _ = pio.read_safetensors(FIX / case / pio.WEIGHTS_NAME)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-8)
        assert not np.array_equal(want[k], io["raw." + k])  # some block was projected
    c = pj.constrain(tree)
    np.testing.assert_allclose(
        c["fc2"]["kernel"].arrays["default"]["oft_R"], want[P + "fc2.oft_R.weight"], rtol=1e-6
    )
    # the projection is idempotent: PEFT's projected file is left bit for bit as it is
    again = pj.constrain(loaded)
    for m in ("fc1", "fc2"):
        np.testing.assert_array_equal(
            again[m]["kernel"].arrays["default"]["oft_R"], want[f"{P}{m}.oft_R.weight"]
        )


def _with_flat(tree, module, v):
    node = tree[module]["kernel"]
    new = node.replace(arrays={**node.arrays, "default": {"oft_R": v}})
    return {**tree, module: {**tree[module], "kernel": new}}


def _peft_coft_training(v0, x, t, W, b, block, eps, lr, steps):
    """PEFT's loop, written out: before each forward the parameter is projected in place
    (no grad); the gradient is taken at the projected value; SGD updates the projected value."""

    def loss_at(v):  # the forward on a parameter that is already projected (no projection here)
        R = jnp.asarray(_neumann_bd(v, block))
        return jnp.mean(jnp.square((x @ R) @ W + b - t))

    grad = jax.jit(jax.grad(loss_at))
    v, out = v0, []
    for _ in range(steps):
        v = coft_reference(v, block, eps)  # `self.weight.copy_(self._project_batch(...))`
        g = grad(v)
        v = v - lr * g
        out.append(coft_reference(v, block, eps))  # what the next forward sees
    return out


def coft_reference(v, block, eps):
    return jnp.asarray(rm.coft_project(np.asarray(v, np.float64), block, eps), jnp.float32)


def _neumann_bd(v, block, m=5):
    """R_bd (jnp, differentiable) of the Neumann series, written independently of peftjax."""
    rows, cols = np.triu_indices(block, 1)
    u = jnp.zeros((v.shape[0], block, block)).at[:, rows, cols].set(v)
    q = u - jnp.swapaxes(u, 1, 2)
    eye = jnp.eye(block)
    r = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    return jax.scipy.linalg.block_diag(*[r[i] for i in range(v.shape[0])])


def test_coft_training_with_constrain_is_peft_training():
    rng = np.random.default_rng(4)
    p = make_mlp()
    W, b = p["params"]["fc1"]["kernel"], p["params"]["fc1"]["bias"]
    x = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, 20)), jnp.float32)
    eps, lr, steps = 0.3, 0.5, 3
    cfg = pj.OFTConfig(oft_block_size=4, coft=True, eps=eps, target_modules=["fc1"])
    q = pj.inject({"fc1": p["params"]["fc1"]}, cfg, key=0)
    v0 = jnp.asarray(rng.normal(0, 0.1, (3, 6)), jnp.float32)  # some blocks outside the ball
    q = _with_flat(q, "fc1", v0)
    assert not np.allclose(coft_reference(v0, 4, eps), v0)
    q = pj.constrain(q)  # once before training: PEFT's first forward projects the start value
    peft = _peft_coft_training(v0, x, t, W, b, 4, eps, lr, steps)

    fc1 = lambda tr: x @ tr["fc1"]["kernel"] + tr["fc1"]["bias"]  # noqa: E731
    trainable, frozen = pj.partition(q)

    @jax.jit
    def step(trainable):
        loss = lambda tr: jnp.mean(jnp.square(pj.apply(fc1)(pj.combine(tr, frozen)) - t))  # noqa: E731
        g = jax.grad(loss)(trainable)
        new = jax.tree_util.tree_map(lambda a, g: a - lr * g, trainable, g)
        return pj.partition(pj.constrain(pj.combine(new, frozen)))[0]

    ours = []
    for _ in range(steps):
        trainable = step(trainable)
        ours.append(pj.combine(trainable, frozen)["fc1"]["kernel"].arrays["default"]["oft_R"])
    for i, (a, want) in enumerate(zip(ours, peft, strict=True)):
        np.testing.assert_allclose(a, want, rtol=2e-5, atol=1e-7, err_msg=f"step {i}")
    # the norms of the trained blocks stay within the ball
    eps_s = eps / np.sqrt(3)
    assert np.all(np.sqrt(2) * np.linalg.norm(np.asarray(ours[-1]), axis=1) <= eps_s * (1 + 1e-5))


# ---------------------------------------------------------------------------------- sizes, errors


def test_block_size_moves_with_a_warning():
    p = make_mlp()
    with pytest.warns(UserWarning, match=r"`fc1`.*`oft_block_size` \(5\).*\(4\)") as rec:
        q = pj.inject(p, pj.OFTConfig(oft_block_size=5, target_modules=["fc1", "fc2"]), key=0)
    assert len(rec) == 1  # fc2 (20 features) keeps 5
    s1 = q["params"]["fc1"]["kernel"].spec("default")
    s2 = q["params"]["fc2"]["kernel"].spec("default")
    assert (s1.n_blocks, s1.block_size, s2.n_blocks, s2.block_size) == (3, 4, 4, 5)
    with pytest.warns(UserWarning, match=r"`fc1`.*`r` \(5\).*\(4\)"):
        q = pj.inject(p, pj.OFTConfig(r=5, oft_block_size=0, target_modules=["fc1"]), key=0)
    s = q["params"]["fc1"]["kernel"].spec("default")
    assert (s.n_blocks, s.block_size) == (4, 3)
    with pytest.warns(UserWarning, match=r"`fc1`.*\(64\).*\(12\)"):  # larger than the features
        pj.inject(p, pj.OFTConfig(oft_block_size=64, target_modules=["fc1"]), key=0)
    # PEFT warns again when it loads such an adapter
    with pytest.warns(UserWarning, match=r"`fc1`.*\(5\).*\(4\)"):
        pio.load_pretrained(base_params("oft_block_size_moved"), FIX / "oft_block_size_moved")
    for d, v in [(12, 5), (64, 24), (64, 12), (20, 9), (12, 13), (20, 7), (27, 9)]:
        assert adjust_oft_parameters(d, v) == rm.oft_adjust(d, v)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(r=2, oft_block_size=4), "oft_block_size"),
        (dict(r=0, oft_block_size=0), "r"),
        (dict(r=-1, oft_block_size=0), "r"),
        (dict(oft_block_size=2.5), "oft_block_size"),
        (dict(init_weights="gaussian"), "init_weights"),
        (dict(coft="yes"), "coft"),
        (dict(coft=True, eps=0.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(num_cayley_neumann_terms=-1), "num_cayley_neumann_terms"),
        (dict(module_dropout=1.5), "module_dropout"),
        (dict(block_share=1), "block_share"),
        (dict(layers_pattern="layers"), "layers_pattern"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(pj.ConfigError, match=f"`{field}`"):
        pj.OFTConfig(target_modules=["fc1"], **kw)


def test_config_dict_rules():
    cfg = pj.OFTConfig(oft_block_size=4, target_modules=["fc1"], coft=True, eps=0.1)
    d = cfg.to_dict()
    assert d["bias"] == "none" and d["peft_type"] == "OFT" and d["r"] == 0
    assert pj.config_from_dict(d) == cfg
    fixture = json.loads((FIX / "oft_coft" / pio.CONFIG_NAME).read_text())
    assert set(d) == set(fixture)  # every field PEFT writes, no other
    with pytest.raises(pj.ConfigError, match="`bias`"):
        pj.OFTConfig.from_dict({**d, "bias": "all"})
    with pytest.raises(pj.ConfigError, match="`oft_block_size`"):  # PEFT < 0.14 file
        pj.OFTConfig.from_dict({k: v for k, v in d.items() if k != "oft_block_size"})
    with pytest.warns(UserWarning, match="0.18.0"):  # the Neumann series changed in 0.18
        pj.OFTConfig.from_dict({**d, "use_cayley_neumann": True, "peft_version": "0.17.1"})


def test_unsupported_modules_and_bad_given_config(tmp_path):
    rng = np.random.default_rng(5)
    for shape in [(3, 4, 8), (3, 1, 4, 8)]:  # 1-D conv, non-square kernel
        p = {"c": {"kernel": jnp.asarray(rng.normal(size=shape), jnp.float32)}}
        with pytest.raises(pj.UnsupportedModuleError, match=r"`c`.*square"):
            pj.inject(
                p,
                pj.OFTConfig(oft_block_size=4, target_modules=["c"]),
                key=0,
                layouts=pj.Layout("conv"),
            )
    loaded = load("oft_linear")
    for bad, match in [
        (
            pj.OFTConfig(oft_block_size=2, target_modules=["fc1", "fc2"], use_cayley_neumann=False),
            "blocks of size",
        ),
        (pj.OFTConfig(oft_block_size=4, target_modules=["fc1", "fc2"]), "use_cayley_neumann"),
    ]:
        with pytest.raises(pj.ConfigError, match=match):
            pio.save_pretrained(loaded, tmp_path / "x", config=bad)
    ok = pj.OFTConfig(oft_block_size=4, target_modules=["fc1", "fc2"], use_cayley_neumann=False)
    pio.save_pretrained(loaded, tmp_path / "ok", config=ok)


def test_coft_projection_matches_the_oracle():
    rng = np.random.default_rng(6)
    v = rng.normal(0, 0.2, (2, 5, 6)).astype(np.float32)  # a stack of two layers
    project = jax.jit(coft_project, static_argnums=(1, 2))
    got = np.asarray(project(jnp.asarray(v), 4, 0.4))
    for i in range(2):
        np.testing.assert_allclose(
            got[i], rm.coft_project(v[i].astype(np.float64), 4, 0.4), rtol=1e-6, atol=1e-8
        )
    np.testing.assert_array_equal(np.asarray(project(jnp.asarray(got), 4, 0.4)), got)
