"""AdaLoRA against HF PEFT 0.21.2: files, forward, merge, orthogonal regulariser and the rank
allocator (``tests/fixtures/peft/adalora_*``, ``llama_adalora``; MANIFEST_MORE.md).

The allocator test feeds PEFT's recorded trajectory (post-step params and the gradients of each
step) through `pj.adalora_update_and_allocate` under ``jit`` with a traced step and checks
PEFT's budgets, mask flags, masked E (bit for bit), rank patterns, thresholds and importance
EMAs; a short training run shows the budget reaching ``target_r`` and PEFT's saved files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import peftjax as pj
from peftjax import io as pio
from peftjax.methods.adalora import AdaLoraSpec

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
P = "base_model.model."
PRUNED = ["adalora_pruned", "adalora_rank0", "adalora_trajectory"]
KEYS = ("lora_A", "lora_B", "lora_E")
# RBG keys: their random-bits programs compile several times faster than threefry's (the
# initial values never matter here: they are replaced or only their shapes are used)
KEY = jax.random.key(0, impl="unsafe_rbg")
#: one compilation of the allocator step (traced step) for the tests sharing its shapes
STEP = jax.jit(pj.adalora_update_and_allocate)


# ---------------------------------------------------------------------------------- helpers


def flax_from_torch(sd: dict, prefix: str = "") -> dict:
    """A torch ``state_dict`` as HF Flax params (Linear ``[out, in]`` -> ``kernel [in, out]``,
    ``embed_tokens`` -> ``embedding``, 1-D unchanged)."""
    out: dict = {}
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        *mods, p = k[len(prefix) :].split(".")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        if v.ndim == 2 and mods[-1] == "embed_tokens":
            node["embedding"] = jnp.asarray(v)
        elif v.ndim == 2:
            node["kernel"] = jnp.asarray(v.T)
        else:
            node[p] = jnp.asarray(v)
    return out


def base_params(case: str) -> dict:
    return flax_from_torch(load_file(str(FIX / case / "base.safetensors")))


def io_data(case: str) -> dict:
    return load_file(str(FIX / case / "io.safetensors"))


def mlp(p, x):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def arrays_of(tree, module: str, name: str = "default") -> dict:
    return tree[module]["kernel"].arrays[name]


def with_arrays(tree, new: dict, name: str = "default"):
    """``tree`` with the arrays of adapter ``name`` at ``{module: arrays}`` replaced."""
    out = dict(tree)
    for m, a in new.items():
        node = tree[m]["kernel"]
        out[m] = {**tree[m], "kernel": node.replace(arrays={**node.arrays, name: a})}
    return out


def from_torch_arrays(t: dict, prefix: str) -> dict:
    """PEFT's ``lora_A [r, in]``, ``lora_B [out, r]``, ``lora_E [r, 1]`` under ``prefix`` as
    peftjax arrays."""
    return {
        "lora_A": jnp.asarray(t[f"{prefix}.lora_A"].T),
        "lora_B": jnp.asarray(t[f"{prefix}.lora_B"].T),
        "lora_E": jnp.asarray(t[f"{prefix}.lora_E"][:, 0]),
    }


def assert_file_equal(got_dir: Path, want_dir: Path):
    got, _ = pio.read_safetensors(got_dir / pio.WEIGHTS_NAME)
    want, _ = pio.read_safetensors(want_dir / pio.WEIGHTS_NAME)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def config_diff(got_dir: Path, want_dir: Path) -> dict:
    """Config fields that differ, but for bookkeeping (``auto_mapping``) and the order of
    ``target_modules`` (PEFT writes a set)."""
    a = json.loads((got_dir / pio.CONFIG_NAME).read_text())
    b = json.loads((want_dir / pio.CONFIG_NAME).read_text())
    a.pop("auto_mapping"), b.pop("auto_mapping")
    a["target_modules"], b["target_modules"] = (
        sorted(a["target_modules"]),
        sorted(b["target_modules"]),
    )
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}


# ---------------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize(  # the rank-0 fixture by default (its zero-size arrays), the others slow
    "case", [c if c == "adalora_rank0" else pytest.param(c, marks=pytest.mark.slow) for c in PRUNED]
)
def test_pruned_fixture_loads_runs_merges_and_saves_back(case, tmp_path):
    params, io = base_params(case), io_data(case)
    cfg = json.loads((FIX / case / pio.CONFIG_NAME).read_text())
    loaded = pio.load_pretrained(params, FIX / case)
    for m in ("fc1", "fc2"):
        node = loaded[m]["kernel"]
        spec = node.spec("default")
        keep = cfg["rank_pattern"][f"{m}.lora_E"]
        assert isinstance(spec, AdaLoraSpec)
        assert (spec.r, spec.init_r, spec.rank_pattern) == (sum(keep), cfg["init_r"], tuple(keep))
        # ranknum stays init_r: the scale is alpha / init_r, whatever the rank
        assert spec.scaling == (cfg["lora_alpha"] / (cfg["init_r"] + 1e-5),)
        assert node.arrays["default"]["lora_E"].shape == (sum(keep),)
    if case == "adalora_rank0":
        assert arrays_of(loaded, "fc1")["lora_A"].shape == (12, 0)
    y = jax.jit(pj.apply(mlp))(loaded, jnp.asarray(io["x"]))
    np.testing.assert_allclose(np.asarray(y), io["y_adapted"], rtol=1e-5, atol=1e-5)
    merged = pj.merge_and_unload(loaded)
    want = flax_from_torch(io, "merged.")
    for m in ("fc1", "fc2"):
        np.testing.assert_allclose(merged[m]["kernel"], want[m]["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(merged[m]["bias"], want[m]["bias"])
    # save back: PEFT's tensors (sliced, zero-size for rank 0) and config (rank_pattern)
    out = pio.save_pretrained(loaded, tmp_path / "rebuilt")
    assert_file_equal(out, FIX / case)
    assert config_diff(out, FIX / case) == {}
    out = pio.save_pretrained(loaded, tmp_path / "given", config=pio.read_adapter(FIX / case)[0])
    assert_file_equal(out, FIX / case)
    assert config_diff(out, FIX / case) == {}
    # the live tensors before slicing (`full.*`): pruning them by the pattern gives the file
    if case != "adalora_trajectory":
        full = {m: from_torch_arrays(io, f"full.{P}{m}") for m in ("fc1", "fc2")}
        unpruned = dataclasses.replace(pio.read_adapter(FIX / case)[0], rank_pattern=None)
        live = pj.inject(params, unpruned, key=KEY)
        live = with_arrays(live, full)
        keep = {m: jnp.asarray(cfg["rank_pattern"][f"{m}.lora_E"]) for m in ("fc1", "fc2")}
        state = {**pj.adalora_init_state(live), "keep": keep, "has_pattern": jnp.asarray(True)}
        pruned = pj.adalora_prune(live, state)
        out = pio.save_pretrained(pruned, tmp_path / "pruned")
        assert_file_equal(out, FIX / case)
        assert config_diff(out, FIX / case) == {}


@pytest.fixture(scope="module")
def flax_llama():
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((FIX / "llama_adalora" / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)
    return model


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_llama_logits_and_orth_reg(flax_llama):
    model = flax_llama
    case = "llama_adalora"
    io = io_data(case)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    loaded = pio.load_pretrained(base_params(case), FIX / case)
    cfg = pio.read_adapter(FIX / case)[0]
    assert cfg.task_type == "CAUSAL_LM" and cfg.rank_pattern is None

    def loss_fn(p):
        logits = model(ids, params=p).logits
        lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)
        return logits, jnp.mean(nll)

    logits, loss = jax.jit(pj.apply(loss_fn))(loaded)
    np.testing.assert_allclose(np.asarray(logits), io["logits_adapted"], atol=1e-4, rtol=1e-4)
    merged = jax.tree_util.tree_leaves_with_path(pj.merge_and_unload(loaded))
    want = jax.tree_util.tree_leaves_with_path(flax_from_torch(io, "merged."))
    assert [k for k, _ in merged] == [k for k, _ in want]
    for (k, a), (_, b) in zip(merged, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(k))
    R = pj.adalora_orth_reg(loaded)
    np.testing.assert_allclose(float(R), float(io["orth_reg"][0]), rtol=1e-5)
    # PEFT's loss with a task_type: the HF loss + orth_reg_weight * R
    assert float(loss) == pytest.approx(float(io["loss_plain"][0]), abs=2e-5)
    total = loss + cfg.orth_reg_weight * R
    assert float(total) == pytest.approx(float(io["loss_with_orth"][0]), abs=2e-5)
    # differentiable, with adapter-sized gradients
    g = jax.jit(jax.grad(pj.adalora_orth_reg))(loaded)
    ga = g["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].arrays["default"]
    assert ga["lora_A"].shape == (32, 4) and bool(jnp.all(jnp.isfinite(ga["lora_A"])))


# ---------------------------------------------------------------------------------- allocator


class Trajectory:
    def __init__(self):
        d = FIX / "adalora_trajectory"
        self.arrays = load_file(str(d / "trajectory.safetensors"))
        self.meta = json.loads((d / "trajectory.json").read_text())
        self.config = pj.AdaLoraConfig(target_modules=["fc1", "fc2"], **self.meta["config"])

    def arrays_at(self, prefix: str) -> dict:
        return {m: from_torch_arrays(self.arrays, f"{prefix}.{P}{m}") for m in ("fc1", "fc2")}


def test_allocator_reproduces_peft_trajectory(tmp_path):
    tr = Trajectory()
    params = pj.inject(base_params("adalora_trajectory"), tr.config, key=KEY)
    state = pj.adalora_init_state(params)
    assert jax.tree_util.tree_map(jnp.shape, state["keep"]) == {"fc1": (4,), "fc2": (4,)}
    R = pj.adalora_orth_reg(with_arrays(params, tr.arrays_at("init")))
    assert float(R) == pytest.approx(tr.meta["orth_reg_init"], rel=1e-6)
    masks = 0
    for rec in tr.meta["steps"]:
        t = rec["t"]
        pre = with_arrays(params, tr.arrays_at(f"step{t}.pre"))
        grads = with_arrays(params, tr.arrays_at(f"step{t}.grad"))
        post = tr.arrays_at(f"step{t}.post")
        params, state, info = STEP(pre, grads, state, jnp.asarray(t))  # t traced, not static
        assert int(info["budget"]) == rec["budget"], t
        assert bool(info["mask_ind"]) == rec["mask_ind"], t
        assert bool(info["masked"]) == (rec["action"] != "update"), t
        for m in ("fc1", "fc2"):
            for k in KEYS:  # masked E exactly; A and B untouched
                np.testing.assert_array_equal(
                    arrays_of(params, m)[k], post[m][k], err_msg=f"step {t} {m} {k}"
                )
            zero = list(np.asarray(arrays_of(params, m)["lora_E"]) == 0)
            assert zero == rec["masked_E"][P + m], t
        if rec["action"] in ("update+mask", "final_mask"):
            masks += 1
            want = {k.removesuffix(".default"): v for k, v in rec["rank_pattern"].items()}
            assert pj.adalora_rank_pattern(params, state) == want, t
            assert float(info["threshold"]) == pytest.approx(rec["threshold"], rel=1e-6)
            assert {m: int(v) for m, v in info["ranks"].items()} == {
                m: rec["ranks"][f"{m}.lora_E.default"] for m in ("fc1", "fc2")
            }
        else:
            assert np.isnan(float(info["threshold"]))
        if rec["action"] in ("update", "update+mask"):
            for m in ("fc1", "fc2"):
                for k in KEYS:
                    for ema in ("ipt_avg", "ipt_unc"):
                        want = tr.arrays[f"step{t}.{ema}.{P}{m}.{k}"]
                        got = np.asarray(state[ema][m][k])
                        got = got[:, None] if k == "lora_E" else got.T
                        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{t} {ema}")
        if rec["action"] == "final_mask":  # PEFT's reset_ipt
            assert not any(
                np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(state["ipt_avg"])
            )
    assert masks == 4
    final = {k.removesuffix(".default"): v for k, v in tr.meta["final_rank_pattern"].items()}
    assert pj.adalora_rank_pattern(params, state) == final
    # the state after t = 12, pruned and saved: PEFT's adapter file and config, bit for bit
    out = pio.save_pretrained(pj.adalora_prune(params, state), tmp_path)
    assert_file_equal(out, FIX / "adalora_trajectory")
    assert config_diff(out, FIX / "adalora_trajectory") == {}


def test_allocator_is_pure_and_prunes_only_after_a_mask():
    tr = Trajectory()
    params = with_arrays(
        pj.inject(base_params("adalora_trajectory"), tr.config, key=KEY), tr.arrays_at("step4.pre")
    )
    grads = with_arrays(params, tr.arrays_at("step4.grad"))
    state = pj.adalora_init_state(params)
    before = jax.tree_util.tree_map(np.asarray, (params, state))
    q, s, info = STEP(params, grads, state, jnp.asarray(4))
    after = jax.tree_util.tree_map(np.asarray, (params, state))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert bool(info["masked"]) and bool(s["has_pattern"])
    # before any mask PEFT saves the full init_r adapter without a rank_pattern
    assert pj.adalora_rank_pattern(params, state) is None
    same = pj.adalora_prune(params, state)
    assert arrays_of(same, "fc1")["lora_E"].shape == (4,)
    pruned = pj.adalora_prune(q, s)
    assert {m: arrays_of(pruned, m)["lora_E"].shape[0] for m in ("fc1", "fc2")} == {
        m: int(v) for m, v in info["ranks"].items()
    }
    x = jnp.ones((3, 12))
    np.testing.assert_allclose(pj.apply(mlp)(pruned, x), pj.apply(mlp)(q, x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # compile-heavy: runs with `-m slow` (CI runs both)
def test_training_reaches_target_budget_and_saves_rank_pattern(tmp_path):
    rng = np.random.default_rng(0)
    base = {
        "fc1": {
            "kernel": jnp.asarray(rng.normal(0, 0.3, (8, 16)), jnp.float32),
            "bias": jnp.zeros(16),
        },
        "fc2": {
            "kernel": jnp.asarray(rng.normal(0, 0.3, (16, 8)), jnp.float32),
            "bias": jnp.zeros(8),
        },
    }
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.normal(size=(8, 8)), jnp.float32))
    cfg = pj.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, tinit=20, tfinal=40, deltaT=5, total_step=200,
        target_modules=["fc1", "fc2"],
    )  # fmt: skip
    params = pj.inject(base, cfg, key=KEY)
    state = pj.adalora_init_state(params)
    tx = optax.adam(1e-2)
    opt = tx.init(pj.partition(params)[0])

    def loss_of(p):
        return jnp.mean((pj.apply(mlp)(p, x) - y) ** 2) + cfg.orth_reg_weight * pj.adalora_orth_reg(
            p
        )

    @jax.jit
    def train_step(params, opt, state, t):
        trainable, frozen = pj.partition(params)
        loss, grads = jax.value_and_grad(lambda tr: loss_of(pj.combine(tr, frozen)))(trainable)
        updates, opt = tx.update(grads, opt, trainable)
        params = pj.combine(optax.apply_updates(trainable, updates), frozen)
        params, state, info = pj.adalora_update_and_allocate(params, grads, state, t)
        return params, opt, state, info, loss

    budgets, losses = [], []
    for t in range(cfg.total_step):
        params, opt, state, info, loss = train_step(params, opt, state, t)
        budgets.append(int(info["budget"]))
        losses.append(float(loss))
    assert budgets[0] == 8 and budgets[cfg.tinit] == 8 and budgets[-1] == 4
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) > 3
    assert losses[-1] < 0.5 * losses[0]
    ranks = {m: int(v) for m, v in info["ranks"].items()}
    assert sum(ranks.values()) == cfg.target_r * 2
    for m in ("fc1", "fc2"):  # the triplets outside the final mask are zero
        keep = np.asarray(state["keep"][m])
        assert np.all(np.asarray(arrays_of(params, m)["lora_E"])[~keep] == 0)
    pattern = pj.adalora_rank_pattern(params, state)
    assert sorted(pattern) == ["fc1.lora_E", "fc2.lora_E"]
    assert all(len(v) == cfg.init_r for v in pattern.values())
    assert sum(sum(v) for v in pattern.values()) == 4
    pruned = pj.adalora_prune(params, state)
    out = pio.save_pretrained(pruned, tmp_path)
    saved = json.loads((out / pio.CONFIG_NAME).read_text())
    assert saved["rank_pattern"] == pattern and saved["init_r"] == 4 and saved["total_step"] == 200
    tensors, _ = pio.read_safetensors(out / pio.WEIGHTS_NAME)
    assert sorted(tensors) == sorted(f"{P}{m}.{k}" for m in ("fc1", "fc2") for k in KEYS)
    for m in ("fc1", "fc2"):
        assert tensors[f"{P}{m}.lora_E"].shape == (ranks[m], 1)
    back = pio.load_pretrained(base, out)
    np.testing.assert_allclose(
        pj.apply(mlp)(back, x), pj.apply(mlp)(params, x), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------------------------- conv, misc


def test_conv2d_forward_is_pepts_conv_with_the_delta_kernel():
    rng = np.random.default_rng(3)
    p = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 8)), jnp.float32)}}
    cfg = pj.AdaLoraConfig(init_r=2, total_step=10, target_modules=["conv"], lora_alpha=4)
    q = pj.inject(p, cfg, key=KEY)
    node = q["conv"]["kernel"]
    a = {
        k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
        for k, v in node.arrays["default"].items()
    }
    assert {k: v.shape for k, v in a.items()} == {
        "lora_A": (27, 2),
        "lora_E": (2,),
        "lora_B": (2, 8),
    }
    q = {"conv": {"kernel": node.replace(arrays={"default": a})}}
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)

    def conv(pp, x):
        return jax.lax.conv_general_dilated(
            x, pp["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    # PEFT: delta [out, in*kh*kw] = B (A * E) * c, reshaped to the torch kernel [out, in, kh, kw]
    A, B, E = np.asarray(a["lora_A"]).T, np.asarray(a["lora_B"]).T, np.asarray(a["lora_E"])[:, None]
    delta = (B @ (A * E)) * (4 / (2 + 1e-5))
    kernel = np.asarray(p["conv"]["kernel"]) + delta.reshape(8, 3, 3, 3).transpose(2, 3, 1, 0)
    want = conv({"conv": {"kernel": jnp.asarray(kernel)}}, x)
    np.testing.assert_allclose(pj.apply(conv)(q, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        pj.merge_and_unload(q)["conv"]["kernel"], kernel, rtol=1e-5, atol=1e-6
    )
    rules = node.spec("default").file_rules()
    assert {k: v[0] for k, v in rules.items()} == {
        "lora_A": "lora_A",
        "lora_E": "lora_E",
        "lora_B": "lora_B",
    }


def test_config_dict_round_trip_and_live_pattern_keys():
    d = json.loads((FIX / "adalora_pruned" / pio.CONFIG_NAME).read_text())
    cfg = pj.config_from_dict(d)
    assert isinstance(cfg, pj.AdaLoraConfig) and cfg.r == 8 and cfg.init_r == 6
    assert pj.config_from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(pj.config_from_dict(cfg.to_dict()))
    assert cfg.rank_alpha("fc1") == (1, 8) and cfg.rank_alpha("other") == (6, 8)
    live = pj.AdaLoraConfig(
        init_r=2,
        total_step=5,
        target_modules=["fc1"],
        rank_pattern={"fc1.lora_E.default": [True, False]},
    )
    assert live.mask_of("fc1") == (True, False)
    fresh = pj.inject(base_params("adalora_pruned"), live, key=KEY)
    assert arrays_of(fresh, "fc1")["lora_A"].shape == (12, 1)
    assert pj.AdaLoraConfig(total_step=3).to_dict()["rank_pattern"] is None


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(total_step=None), "total_step"),
        (dict(total_step=0), "total_step"),
        (dict(total_step=-3), "total_step"),
        (dict(total_step=10, tinit=6, tfinal=4), "tinit"),  # tinit >= total_step - tfinal
        (dict(total_step=10, tinit=10), "tinit"),
        (dict(total_step=10, use_dora=True), "use_dora"),
        (dict(total_step=10, init_r=0), "init_r"),
        (dict(total_step=10, deltaT=0), "deltaT"),
        (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
        (dict(total_step=10, lora_dropout=1.0), "lora_dropout"),
        (dict(total_step=10, bias="all"), "bias"),
        (dict(total_step=10, init_lora_weights="pissa"), "init_lora_weights"),
        (dict(total_step=10, init_r=2, rank_pattern={"fc1.lora_E": [True]}), "rank_pattern"),
        (dict(total_step=10, init_r=2, rank_pattern={"fc1": [True, True]}), "rank_pattern"),
        (dict(total_step=10, init_r=2, rank_pattern={"fc1.lora_E": [1, 0]}), "rank_pattern"),
    ],
)
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(pj.ConfigError, match=f"`{field}"):
        pj.AdaLoraConfig(target_modules=["fc1"], **kw)


def test_bad_inputs():
    base = base_params("adalora_pruned")
    shapes = jax.eval_shape(lambda: base)  # abstract injections where only shapes matter
    d = json.loads((FIX / "adalora_pruned" / pio.CONFIG_NAME).read_text())
    with pytest.raises(pj.ConfigError, match="loftq_config"):
        pj.config_from_dict({**d, "loftq_config": {"loftq_bits": 4}})
    ok = dict(init_r=2, target_r=1, total_step=10)
    A = lambda targets, **kw: pj.AdaLoraConfig(target_modules=targets, **{**ok, **kw})  # noqa: E731
    with pytest.raises(pj.TargetError, match="fc9.lora_E"):
        pj.inject(shapes, A(["fc1"], rank_pattern={"fc9.lora_E": [True, True]}), key=KEY)
    with pytest.raises(pj.UnsupportedModuleError, match="emb"):
        pj.inject({"emb": {"embedding": jnp.ones((10, 4))}}, A(["emb"]), key=KEY)
    conv1d = {"c": {"kernel": jax.ShapeDtypeStruct((3, 4, 5), jnp.float32)}}
    with pytest.raises(pj.UnsupportedModuleError, match="Conv2d"):
        pj.inject(conv1d, A(["c"]), key=KEY, layouts=pj.Layout("conv"))
    with pytest.raises(pj.AdapterNameError, match="no AdaLoRA adapter"):
        pj.adalora_init_state(base)
    with pytest.raises(pj.ConfigError, match="beta1"):
        pj.adalora_init_state(pj.inject(shapes, A(["fc1"], beta1=1.0), key=KEY))
    with pytest.raises(pj.ConfigError, match="target_r"):
        pj.adalora_init_state(pj.inject(shapes, A(["fc1"], target_r=3), key=KEY))
    abstract = pj.inject(shapes, A(["fc1", "fc2"]), key=KEY)
    state = pj.adalora_init_state(abstract)
    with pytest.raises(pj.ShapeError, match="grads"):
        pj.adalora_update_and_allocate(abstract, base, state, 0)
    with pytest.raises(pj.ShapeError, match="adalora_init_state"):
        pj.adalora_update_and_allocate(abstract, abstract, {"keep": {}}, 0)
    stacked = {"layers": {"fc": {"kernel": jax.ShapeDtypeStruct((2, 4, 4), jnp.float32)}}}
    sq = pj.inject(stacked, A(["fc"]), key=KEY, layouts=pj.Layout("dense", stack=1))
    st = pj.adalora_init_state(sq)
    assert st["keep"]["layers.fc"].shape == (2, 2)
    with pytest.raises(pj.ShapeError, match="stacked"):
        pj.adalora_prune(sq, {**st, "has_pattern": jnp.asarray(True)})
    q = pj.inject(base, A(["fc1"]), key=KEY)  # concrete: merge and the regulariser
    two = pj.inject(q, A(["fc1"]), key=KEY, name="other", trainable=False)
    assert float(pj.adalora_orth_reg(two)) > 0  # the one trainable adapter
    two = pj.set_trainable(two, "other", True)  # two trainable ones: the name is needed
    with pytest.raises(pj.AdapterNameError, match="name="):
        pj.adalora_orth_reg(two)
    with pytest.raises(pj.AdapterNameError, match="nope"):
        pj.adalora_orth_reg(two, name="nope")
    assert float(pj.adalora_orth_reg(two, name="other")) > 0
    with pytest.raises(pj.MergeError, match="unmerge"):
        pj.adalora_update_and_allocate(pj.merge(q), q, pj.adalora_init_state(q), 0)


def test_a_second_trainable_adalora_adapter_is_refused():
    """PEFT: "AdaLoraModel supports only 1 trainable adapter"; a frozen second one is fine."""
    p = {"fc": {"kernel": jnp.ones((8, 6))}}
    cfg = pj.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["fc"])
    q = pj.inject(p, cfg, key=0)
    with pytest.raises(pj.ConfigError, match=r"trainable adalora adapter.*\['default'\]"):
        pj.inject(q, cfg, key=1, name="second")
    frozen = dataclasses.replace(cfg, inference_mode=True)
    q2 = pj.inject(q, frozen, key=1, name="second")
    assert pj.frozen_adapters(q2) == ("second",)
    q3 = pj.inject(pj.set_trainable(q, "default", False), cfg, key=1, name="second")
    assert pj.frozen_adapters(q3) == ("default",)
    pj.inject(q, pj.LoraConfig(r=2, target_modules=["fc"]), key=1, name="lora")  # other methods
