"""P-tuning prompt encoders (`peftjax.methods._encoders`) against HF PEFT 0.21.2 ``PromptEncoder``.

The reference file ``tests/fixtures/peft/prompt_encoders.safetensors`` is written by
``tests/fixtures/make_encoder_fixtures.py`` (torch + peft; never imported here): each case's full
``state_dict`` and its eval-mode output for ``indices = arange(T)``. Besides it, an independent
NumPy LSTM checks the recurrence, and the init, gradient and dropout rules are checked directly.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from peftjax.errors import ConfigError, ShapeError
from peftjax.methods._encoders import (
    encoder_param_shapes,
    init_lstm_encoder,
    init_mlp_encoder,
    lstm_encoder,
    mlp_encoder,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "peft" / "prompt_encoders.safetensors"

# Every test uses the fixture's sizes where it can, so that the encoders' compiled programs
# (cached per shape) are shared and the file stays fast.
D, H, T, H_MLP = 32, 8, 3, 16
_lstm, _mlp = lstm_encoder, mlp_encoder


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(FIXTURE), "np") as f:
        cases = json.loads(f.metadata()["cases"])
    return cases, load_file(str(FIXTURE))


def _case(ref, name):
    cases, tensors = ref
    pre = f"{name}/"
    entries = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
    emb = entries.pop("embedding.weight")
    out = entries.pop("output")
    return cases[name], entries, emb, out


def _normal(seed, shape):
    # Test inputs from NumPy: eager JAX draws would compile a program per shape.
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run(case, params, x, rng=None):
    if case["kind"] == "MLP":
        return _mlp(params, x)
    return _lstm(params, x, num_layers=case["num_layers"], dropout=case["dropout"], rng=rng)


# --- against PEFT ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "lstm", "lstm1"])
def test_matches_peft_prompt_encoder(ref, name):
    case, params, emb, out = _case(ref, name)
    shapes = encoder_param_shapes(
        case["kind"], case["token_dim"], case["hidden"], case["num_layers"]
    )
    assert {k: v.shape for k, v in params.items()} == shapes  # names exactly as torch's
    assert emb.shape == out.shape == (case["T"], case["token_dim"])
    got = np.asarray(_run(case, params, emb))  # rng=None: eval, as the fixture
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, out, atol=1e-5, rtol=0)


def test_state_dict_order_matches_torch(ref):
    """`encoder_param_shapes` lists the names in torch's state-dict order (file order is sorted,
    so compare with the order torch's modules register them: per layer ih, hh, b_ih, b_hh, then
    the reverse direction)."""
    names = list(encoder_param_shapes("LSTM", 32, 8, 2))
    assert names[:8] == [
        "lstm_head.weight_ih_l0",
        "lstm_head.weight_hh_l0",
        "lstm_head.bias_ih_l0",
        "lstm_head.bias_hh_l0",
        "lstm_head.weight_ih_l0_reverse",
        "lstm_head.weight_hh_l0_reverse",
        "lstm_head.bias_ih_l0_reverse",
        "lstm_head.bias_hh_l0_reverse",
    ]
    assert names[-4:] == [
        "mlp_head.0.weight",
        "mlp_head.0.bias",
        "mlp_head.2.weight",
        "mlp_head.2.bias",
    ]
    assert list(encoder_param_shapes("mlp", 32, 16, 7)) == [
        f"mlp_head.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    ]  # MLP ignores num_layers, as PEFT
    assert encoder_param_shapes("MLP", 32, None) == encoder_param_shapes("MLP", 32, 32)


def test_torch_init_ranges_match_ours(ref):
    """torch's own initial parameters (the fixture, straight from the constructor) lie within the
    bounds `init_*_encoder` uses, and fill them: the bound formulas are torch's."""
    for name in ("mlp", "lstm", "lstm1"):
        case, params, emb, _ = _case(ref, name)
        ours = (
            init_mlp_encoder(jax.random.key(0), case["token_dim"], case["hidden"])
            if case["kind"] == "MLP"
            else init_lstm_encoder(
                jax.random.key(0), case["token_dim"], case["hidden"], case["num_layers"]
            )
        )
        for k, v in params.items():
            bound = _bound(k, params)
            assert np.abs(v).max() <= bound * (1 + 1e-6), k  # float32 rounding of the bound
            assert np.abs(np.asarray(ours[k])).max() <= bound * (1 + 1e-6), k
            if v.size >= 64:
                assert np.abs(v).max() > 0.8 * bound, k


def _bound(name, params):
    if name.startswith("lstm_head."):
        return 1 / math.sqrt(params["lstm_head.weight_hh_l0"].shape[1])
    return 1 / math.sqrt(params[name.rsplit(".", 1)[0] + ".weight"].shape[1])


# --- an independent NumPy LSTM --------------------------------------------------------------------


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _np_step(x_t, h, c, w_ih, w_hh, b_ih, b_hh):
    """One torch LSTM cell step, written from the torch docs (gate order i, f, g, o)."""
    hd = w_hh.shape[1]
    z = w_ih @ x_t + b_ih + w_hh @ h + b_hh
    i, f, g, o = (z[j * hd : (j + 1) * hd] for j in range(4))
    c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    return _sigmoid(o) * np.tanh(c_new), c_new


def _np_lstm_encoder(p, x, num_layers):
    """Bidirectional multi-layer LSTM over ``x [T, D]`` (float64, loops), then the MLP head."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    y = np.asarray(x, np.float64)
    T = y.shape[0]
    for k in range(num_layers):
        outs = []
        for suffix, order in (("", range(T)), ("_reverse", range(T - 1, -1, -1))):
            w = [
                p[f"lstm_head.{n}_l{k}{suffix}"]
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            ]
            hd = w[1].shape[1]
            h, c = np.zeros(hd), np.zeros(hd)
            hs = np.zeros((T, hd))
            for t in order:
                h, c = _np_step(y[t], h, c, *w)
                hs[t] = h
            outs.append(hs)
        y = np.concatenate(outs, axis=1)
    y = np.maximum(y @ p["mlp_head.0.weight"].T + p["mlp_head.0.bias"], 0)
    return y @ p["mlp_head.2.weight"].T + p["mlp_head.2.bias"]


def test_one_lstm_step_by_hand():
    """T = 1, one layer: each direction does one step from h = c = 0, so h = σ(o) tanh(σ(i) tanh(g))
    with z = W_ih x + b_ih + b_hh (f and W_hh play no part)."""
    p = init_lstm_encoder(jax.random.key(3), D, H, 1)
    x = _normal(4, (1, D))
    pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
    hs = []
    for s in ("", "_reverse"):
        z = pn[f"lstm_head.weight_ih_l0{s}"] @ x[0] + pn[f"lstm_head.bias_ih_l0{s}"]
        z = z + pn[f"lstm_head.bias_hh_l0{s}"]
        i, _f, g, o = np.split(z, 4)
        hs.append(_sigmoid(o) * np.tanh(_sigmoid(i) * np.tanh(g)))
    h = np.concatenate(hs)
    hand = np.maximum(pn["mlp_head.0.weight"] @ h + pn["mlp_head.0.bias"], 0)
    hand = pn["mlp_head.2.weight"] @ hand + pn["mlp_head.2.bias"]
    np.testing.assert_allclose(np.asarray(_lstm(p, x, num_layers=1))[0], hand, atol=1e-6)
    # ... and the NumPy step function agrees with that formula.
    w = [pn[f"lstm_head.{n}_l0"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    np.testing.assert_allclose(_np_step(x[0], np.zeros(H), np.zeros(H), *w)[0], hs[0], atol=1e-12)


def test_lstm_matches_numpy_reference():
    """Two layers over a batch of two sequences ([B, T, D], batch first, as PEFT's [1, T, D])."""
    num_layers = 2
    p = init_lstm_encoder(jax.random.key(num_layers), D, H, num_layers)
    # Larger weights than the init so the gates saturate differently and the state matters.
    p = {k: np.asarray(v) * 3.0 for k, v in p.items()}
    x = _normal(10, (2, T, D))
    got = np.asarray(_lstm(p, x, num_layers=num_layers))
    assert got.shape == (2, T, D)
    for b in range(2):
        np.testing.assert_allclose(got[b], _np_lstm_encoder(p, x[b], num_layers), atol=1e-5)
        # batched == one sequence at a time
        np.testing.assert_allclose(
            got[b], np.asarray(_lstm(p, x[b], num_layers=num_layers)), atol=1e-6
        )


def test_mlp_matches_numpy():
    p = init_mlp_encoder(jax.random.key(5), D, H_MLP)
    x = _normal(6, (T, D))
    pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
    y = x
    for i in (0, 2, 4):
        y = y @ pn[f"mlp_head.{i}.weight"].T + pn[f"mlp_head.{i}.bias"]
        y = np.maximum(y, 0) if i < 4 else y
    np.testing.assert_allclose(np.asarray(_mlp(p, x)), y, atol=1e-5)


# --- init -------------------------------------------------------------------------------------


def _check_uniform(params, bound_of):
    """Every array is float32 within its bound, and all values / bound together are U(-1, 1)."""
    pooled = []
    for k, v in params.items():
        v, b = np.asarray(v), bound_of(k)
        assert v.dtype == np.float32, k
        assert np.abs(v).max() <= b * (1 + 1e-6), k  # float32 rounding of the bound
        pooled.append(v.ravel() / b)
    u = np.concatenate(pooled).astype(np.float64)
    assert u.size >= 800
    assert np.abs(u).max() > 0.98
    assert abs(u.mean()) < 0.08
    assert abs(u.std() - 1 / math.sqrt(3)) < 0.035
    assert abs(np.mean(np.abs(u) < 0.5) - 0.5) < 0.06  # flat, not bell-shaped


def test_init_mlp_shapes_and_ranges():
    p = init_mlp_encoder(jax.random.key(0), D, H_MLP)
    shapes = encoder_param_shapes("MLP", D, H_MLP)
    assert list(p) == list(shapes)
    assert {k: v.shape for k, v in p.items()} == shapes
    fan_in = {"mlp_head.0": D, "mlp_head.2": H_MLP, "mlp_head.4": H_MLP}
    _check_uniform(p, lambda k: 1 / math.sqrt(fan_in[k.rsplit(".", 1)[0]]))
    # independent draws per parameter, and per key
    assert not np.allclose(p["mlp_head.0.bias"], p["mlp_head.2.bias"])
    q = init_mlp_encoder(jax.random.key(1), D, H_MLP)
    assert not np.allclose(p["mlp_head.0.weight"], q["mlp_head.0.weight"])


def test_init_lstm_shapes_and_ranges():
    L = 2
    p = init_lstm_encoder(jax.random.key(0), D, H, L)
    shapes = encoder_param_shapes("LSTM", D, H, L)
    assert list(p) == list(shapes)
    assert {k: v.shape for k, v in p.items()} == shapes
    assert shapes["lstm_head.weight_ih_l0"] == (4 * H, D)
    assert shapes["lstm_head.weight_ih_l1_reverse"] == (4 * H, 2 * H)
    assert shapes["lstm_head.weight_hh_l1"] == (4 * H, H)
    assert shapes["lstm_head.bias_ih_l1"] == shapes["lstm_head.bias_hh_l0_reverse"] == (4 * H,)
    assert shapes["mlp_head.0.weight"] == (2 * H, 2 * H)
    assert shapes["mlp_head.2.weight"] == (D, 2 * H)
    assert len(shapes) == 8 * L + 4
    lstm = {k: v for k, v in p.items() if k.startswith("lstm_head.")}
    head = {k: v for k, v in p.items() if k.startswith("mlp_head.")}
    _check_uniform(lstm, lambda k: 1 / math.sqrt(H))  # nn.LSTM: U(-1/sqrt(H), 1/sqrt(H))
    _check_uniform(head, lambda k: 1 / math.sqrt(2 * H))  # both head Linears have fan-in 2H
    assert not np.allclose(p["lstm_head.weight_ih_l1"], p["lstm_head.weight_ih_l1_reverse"])


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_grad_reaches_every_parameter(kind):
    if kind == "MLP":
        p = init_mlp_encoder(jax.random.key(0), D, H_MLP)
        f = _mlp
    else:
        p = init_lstm_encoder(jax.random.key(0), D, H, 2)
        f = partial(_lstm, num_layers=2)
    x = _normal(1, (T, D))
    target = _normal(2, (T, D))

    def loss(p, x):
        return jnp.sum((f(p, x) - target) ** 2)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
    assert set(gp) == set(p)
    for k, g in gp.items():
        g = np.asarray(g)
        assert g.shape == p[k].shape and np.isfinite(g).all(), k
        assert np.abs(g).max() > 0, k
    assert np.abs(np.asarray(gx)).max() > 0  # and to the caller's embedding
    # a finite-difference spot check on one recurrent weight
    if kind == "LSTM":
        name, idx, eps = "lstm_head.weight_hh_l0_reverse", (1, 2), 1e-2
        p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
        xn, tn = np.asarray(x, np.float64), np.asarray(target, np.float64)
        vals = []
        for s in (1, -1):
            q = dict(p64)
            q[name] = q[name].copy()
            q[name][idx] += s * eps
            vals.append(np.sum((_np_lstm_encoder(q, xn, 2) - tn) ** 2))
        np.testing.assert_allclose(
            gp[name][idx], (vals[0] - vals[1]) / (2 * eps), rtol=1e-3, atol=1e-5
        )


# --- dropout ----------------------------------------------------------------------------------


def test_dropout_only_with_rng_and_only_between_layers():
    p2 = init_lstm_encoder(jax.random.key(0), D, H, 2)
    p1 = init_lstm_encoder(jax.random.key(0), D, H, 1)
    x = _normal(1, (T, D))
    r = jax.random.key(7)
    eval2 = np.asarray(_lstm(p2, x, num_layers=2))
    # no rng: eval, whatever the probability
    np.testing.assert_array_equal(np.asarray(_lstm(p2, x, num_layers=2, dropout=0.5)), eval2)
    # rng but p = 0: nothing to drop
    np.testing.assert_array_equal(np.asarray(_lstm(p2, x, num_layers=2, dropout=0.0, rng=r)), eval2)
    # rng and p > 0: training dropout acts, deterministically per key
    train = np.asarray(_lstm(p2, x, num_layers=2, dropout=0.5, rng=r))
    assert not np.allclose(train, eval2)
    np.testing.assert_array_equal(train, np.asarray(_lstm(p2, x, num_layers=2, dropout=0.5, rng=r)))
    other = np.asarray(_lstm(p2, x, num_layers=2, dropout=0.5, rng=jax.random.key(8)))
    assert not np.allclose(train, other)
    # one layer: torch's LSTM dropout is never applied after the last layer (nor in the MLP head)
    eval1 = np.asarray(_lstm(p1, x, num_layers=1))
    np.testing.assert_array_equal(np.asarray(_lstm(p1, x, num_layers=1, dropout=0.5, rng=r)), eval1)
    # p = 1 drops the whole first-layer output: layer 2 sees zeros
    full = _lstm(p2, x, num_layers=2, dropout=1.0, rng=r)
    np.testing.assert_allclose(
        np.asarray(full), np.asarray(_lstm(p2, jnp.zeros((T, D)), num_layers=2, dropout=1.0, rng=r))
    )


def test_dropout_is_torch_inverted_dropout_on_layer_output():
    """Training output = the layers run by hand with the first layer's [fwd ‖ bwd] output
    multiplied by mask / (1 - p), the mask being what `lstm_encoder` draws for layer 0."""
    p_drop = 0.5
    p = init_lstm_encoder(jax.random.key(2), D, H, 2)
    x = _normal(3, (T, D))
    r = jax.random.key(11)
    mask = jax.random.bernoulli(jax.random.fold_in(r, 0), 1 - p_drop, (T, 1, 2 * H))
    keep = np.asarray(mask)[:, 0]  # [T, B=1, 2H] -> [T, 2H]
    assert 0 < keep.mean() < 1
    # layer 0 by hand (NumPy), dropped, then layer 1 + head via the 1-layer NumPy encoder
    pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
    outs = []
    for s, order in (("", range(T)), ("_reverse", range(T - 1, -1, -1))):
        w = [pn[f"lstm_head.{n}_l0{s}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h, c, hs = np.zeros(H), np.zeros(H), np.zeros((T, H))
        for t in order:
            h, c = _np_step(x[t], h, c, *w)
            hs[t] = h
        outs.append(hs)
    y0 = np.concatenate(outs, axis=1) * keep / (1 - p_drop)
    rest = {k.replace("_l1", "_l0"): v for k, v in pn.items() if "_l0" not in k}
    want = _np_lstm_encoder(rest, y0, 1)
    got = np.asarray(_lstm(p, x, num_layers=2, dropout=p_drop, rng=r))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_mlp_any_leading_dims():
    p = init_mlp_encoder(jax.random.key(0), D, H_MLP)
    x = jnp.ones((T, D))
    assert mlp_encoder(p, x).shape == (T, D)
    assert mlp_encoder(p, x[None]).shape == (1, T, D)


# --- errors -----------------------------------------------------------------------------------


def test_errors():
    p = {k: np.zeros(v, np.float32) for k, v in encoder_param_shapes("LSTM", 4, 2, 2).items()}
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ConfigError, match="num_layers"):
        lstm_encoder(p, x, num_layers=1)
    with pytest.raises(ConfigError, match="num_layers"):
        lstm_encoder(p, x, num_layers=3)
    with pytest.raises(ConfigError, match="dropout"):
        lstm_encoder(p, x, num_layers=2, dropout=1.5)
    with pytest.raises(ShapeError):
        lstm_encoder(p, np.ones((4,), np.float32), num_layers=2)
    with pytest.raises(ConfigError, match="encoder_reparameterization_type"):
        encoder_param_shapes("GRU", 4, 2, 1)
    with pytest.raises(ConfigError, match="encoder_num_layers"):
        encoder_param_shapes("LSTM", 4, 2, 0)
    with pytest.raises(ConfigError, match="token_dim"):
        init_mlp_encoder(jax.random.key(0), 0, 2)
