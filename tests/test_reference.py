"""Check the NumPy references in ``tests/reference.py`` against fixtures made by real HF PEFT.

Only numpy, safetensors.numpy and json are used (no torch, no peft): the fixtures were written by
``tests/fixtures/make_peft_fixtures.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import reference as ref

FIX = Path(__file__).resolve().parent / "fixtures" / "peft"
PREFIX = "base_model.model."

MLP_CASES = [
    "lora_linear",
    "lora_rslora_patterns",
    "dora_linear",
    "loha_linear",
    "lokr_linear_full",
    "lokr_linear_decomposed",
    "lokr_linear_decompose_both",
    "ia3_mlp",
]
CONV_CASES = [
    "lora_conv2d",
    "loha_conv2d",
    "loha_conv2d_effective",
    "lokr_conv2d",
    "lokr_conv2d_full",
    "lokr_conv2d_effective",
]
LLAMA_CASES = ["llama_lora", "llama_dora", "llama_loha", "llama_lokr", "llama_ia3"]
ALL_CASES = MLP_CASES + CONV_CASES + ["lora_embedding"] + LLAMA_CASES

RTOL = 1e-5
ATOL = 2e-5


class Case:
    def __init__(self, name: str):
        d = FIX / name
        self.name = name
        self.adapter = {
            k: v.astype(np.float64) for k, v in load_file(d / "adapter_model.safetensors").items()
        }
        self.config = json.loads((d / "adapter_config.json").read_text())
        self.base = load_file(d / "base.safetensors")
        self.io = load_file(d / "io.safetensors")
        self.merged = {
            k[len("merged.") :]: v for k, v in self.io.items() if k.startswith("merged.")
        }

    @property
    def peft_type(self) -> str:
        return self.config["peft_type"]

    def modules(self) -> list[str]:
        """Module paths (without ``base_model.model.``) that carry adapter tensors."""
        out = set()
        for k in self.adapter:
            path = k[len(PREFIX) :]
            out.add(path.rsplit(".", 2 if path.endswith(".weight") else 1)[0])
        return sorted(out)

    def tensors(self, module: str) -> dict[str, np.ndarray]:
        """The module's adapter tensors keyed by parameter name (``lora_A``, ``hada_w1_a`` ...)."""
        p = PREFIX + module + "."
        res = {}
        for k, v in self.adapter.items():
            if k.startswith(p):
                res[k[len(p) :].removesuffix(".weight")] = v
        return res

    def r_alpha(self, module: str) -> tuple[int, float]:
        c = self.config
        alpha_key = "lora_alpha" if self.peft_type == "LORA" else "alpha"
        r = ref.pattern_lookup(c.get("rank_pattern") or {}, module, c["r"])
        alpha = ref.pattern_lookup(c.get("alpha_pattern") or {}, module, c[alpha_key])
        return r, alpha

    def scaling(self, module: str) -> float:
        r, alpha = self.r_alpha(module)
        return ref.lora_scaling(r, alpha, bool(self.config.get("use_rslora")))

    def is_feedforward(self, module: str) -> bool:
        ff = self.config.get("feedforward_modules") or []
        if isinstance(ff, str):
            return re.fullmatch(ff, module) is not None
        return any(module.endswith(f) for f in ff)

    def base_kernel(self, module: str) -> np.ndarray:
        """Base weight of ``module`` in Flax layout, float64."""
        return to_flax(self.base[module + ".weight"].astype(np.float64), self.layer_kind(module))

    def layer_kind(self, module: str) -> str:
        w = self.base[module + ".weight"]
        if w.ndim == 4:
            return "conv"
        if "emb" in module:
            return "embed"
        return "dense"


def to_flax(W: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return ref.torch_to_flax_conv(W)
    if kind == "embed":
        return W
    return ref.torch_to_flax_linear(W)


def adapter_delta(case: Case, module: str) -> np.ndarray:
    """Additive Flax-layout delta of a LoRA / LoHa / LoKr module, from the saved adapter tensors."""
    t = case.tensors(module)
    kind = case.layer_kind(module)
    s = case.scaling(module)
    ksize = case.base[module + ".weight"].shape[2:]
    if case.peft_type == "LORA":
        if kind == "embed":
            return ref.lora_embed_delta(t["lora_embedding_A"].T, t["lora_embedding_B"].T, s)
        if kind == "conv":
            A = t["lora_A"].transpose(2, 3, 1, 0)
            B = t["lora_B"][:, :, 0, 0].T
            return ref.lora_conv_delta(A, B, s)
        return ref.lora_delta(t["lora_A"].T, t["lora_B"].T, s)
    if case.peft_type == "LOHA":
        if "hada_t1" in t:
            return ref.loha_conv_effective_delta(
                t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"],
                t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"], s,
            )  # fmt: skip
        if kind == "conv":
            return ref.loha_conv_delta(
                t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], s, ksize
            )
        return ref.loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], s)
    if case.peft_type == "LOKR":
        w1 = ref.lokr_w1(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"))
        w2 = ref.lokr_w2(t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"))
        if kind == "conv":
            return ref.lokr_conv_delta(w1, w2, s, ksize)
        return ref.lokr_delta(w1, w2, s)
    raise AssertionError(case.peft_type)


def reference_merged(case: Case) -> dict[str, np.ndarray]:
    """Full merged state dict (torch layout) from base + reference math."""
    out = {k: v.astype(np.float64) for k, v in case.base.items()}
    for module in case.modules():
        kind = case.layer_kind(module)
        W = case.base_kernel(module)
        t = case.tensors(module)
        if case.peft_type == "IA3":
            ff = case.is_feedforward(module)
            Wm = ref.ia3_merge(W, t["ia3_l"], ff)
            if module + ".bias" in out:
                out[module + ".bias"] = ref.ia3_merge_bias(out[module + ".bias"], t["ia3_l"], ff)
        elif "lora_magnitude_vector" in t:
            assert kind == "dense"
            Wm = ref.dora_merge(
                W, t["lora_A"].T, t["lora_B"].T, case.scaling(module), t["lora_magnitude_vector"]
            )
        else:
            Wm = W + adapter_delta(case, module)
        if kind == "conv":
            out[module + ".weight"] = ref.flax_to_torch_conv(Wm)
        elif kind == "embed":
            out[module + ".weight"] = Wm
        else:
            out[module + ".weight"] = ref.flax_to_torch_linear(Wm)
    return out


def adapted_dense(case: Case, module: str, x: np.ndarray) -> np.ndarray:
    """Unmerged adapted Dense forward of ``module`` in NumPy (Flax layout)."""
    W = case.base_kernel(module)
    b = case.base.get(module + ".bias")
    b = None if b is None else b.astype(np.float64)
    if module not in case.modules():
        return ref.dense(x, W, b)
    t = case.tensors(module)
    s = case.scaling(module) if case.peft_type != "IA3" else None
    if case.peft_type == "IA3":
        return ref.ia3_forward(x, W, b, t["ia3_l"], case.is_feedforward(module))
    if "lora_magnitude_vector" in t:
        return ref.dora_forward(
            x, W, t["lora_A"].T, t["lora_B"].T, s, t["lora_magnitude_vector"], b
        )
    if case.peft_type == "LORA":
        return ref.lora_forward(x, W, b, t["lora_A"].T, t["lora_B"].T, s)
    # LoHa / LoKr: PEFT adds F.linear(x, dW) to the base output
    return ref.dense(x, W, b) + x @ adapter_delta(case, module)


# --------------------------------------------------------------------------- tests


def test_factorization_matches_peft():
    data = json.loads((FIX / "factorization.json").read_text())
    assert data["columns"] == ["dimension", "factor", "m", "n"]
    assert len(data["cases"]) > 2000
    bad = [
        (dim, f, (m, n), ref.factorization(dim, f))
        for dim, f, m, n in data["cases"]
        if ref.factorization(dim, f) != (m, n)
    ]
    assert not bad, bad[:10]


@pytest.mark.parametrize(
    "dim,factor,expected",
    [
        (16, -1, (4, 4)),
        (32, -1, (4, 8)),
        (768, -1, (24, 32)),
        (3072, -1, (48, 64)),
        (4096, -1, (64, 64)),
        (11008, -1, (86, 128)),
        (127, -1, (1, 127)),
        (128, 4, (4, 32)),
        (128, 8, (8, 16)),
        (96, 5, (4, 24)),
        (128, 64, (64, 2)),
    ],
)
def test_factorization_examples(dim, factor, expected):
    assert ref.factorization(dim, factor) == expected


def test_kaiming_bound():
    assert ref.kaiming_uniform_bound(16) == pytest.approx(0.25)
    a = 5**0.5
    gain = (2.0 / (1 + a * a)) ** 0.5
    assert ref.kaiming_uniform_bound(12) == pytest.approx(3**0.5 * gain / 12**0.5)


def test_layout_helpers_roundtrip():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 3))
    C = rng.normal(size=(8, 3, 2, 4))
    assert ref.torch_to_flax_linear(W).shape == (3, 5)
    np.testing.assert_array_equal(ref.flax_to_torch_linear(ref.torch_to_flax_linear(W)), W)
    assert ref.torch_to_flax_conv(C).shape == (2, 4, 3, 8)
    np.testing.assert_array_equal(ref.flax_to_torch_conv(ref.torch_to_flax_conv(C)), C)


@pytest.mark.parametrize("name", ALL_CASES)
def test_fixture_present(name):
    d = FIX / name
    for f in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "base.safetensors",
        "io.safetensors",
    ):
        assert (d / f).is_file(), f
    assert not (d / "README.md").exists()
    c = Case(name)
    assert c.config["peft_version"].startswith("0.21")
    assert set(c.merged) == set(c.base)
    for k in c.adapter:
        assert k.startswith(PREFIX) and ".default" not in k, k


@pytest.mark.parametrize("name", ALL_CASES)
def test_merged_weights(name):
    case = Case(name)
    expected = reference_merged(case)
    changed = 0
    for k, v in case.merged.items():
        np.testing.assert_allclose(v, expected[k], rtol=RTOL, atol=ATOL, err_msg=f"{name}: {k}")
        changed += not np.array_equal(v, case.base[k])
    assert changed >= len(case.modules())


@pytest.mark.parametrize("name", MLP_CASES)
def test_mlp_adapted_output(name):
    case = Case(name)
    x = case.io["x"].astype(np.float64)
    h = np.maximum(adapted_dense(case, "fc1", x), 0.0)
    y = adapted_dense(case, "fc2", h)
    np.testing.assert_allclose(y, case.io["y_adapted"], rtol=RTOL, atol=ATOL)
    # and the base output from the base weights alone
    Wb1 = ref.torch_to_flax_linear(case.base["fc1.weight"])
    Wb2 = ref.torch_to_flax_linear(case.base["fc2.weight"])
    yb = ref.dense(
        np.maximum(ref.dense(x, Wb1, case.base["fc1.bias"]), 0), Wb2, case.base["fc2.bias"]
    )
    np.testing.assert_allclose(yb, case.io["y_base"], rtol=RTOL, atol=ATOL)
    # merged weights give the same output (PEFT's merge == PEFT's forward)
    W1 = ref.torch_to_flax_linear(case.merged["fc1.weight"])
    W2 = ref.torch_to_flax_linear(case.merged["fc2.weight"])
    ym = ref.dense(
        np.maximum(ref.dense(x, W1, case.merged["fc1.bias"]), 0), W2, case.merged["fc2.bias"]
    )
    np.testing.assert_allclose(ym, case.io["y_adapted"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CONV_CASES)
def test_conv_adapted_output(name):
    case = Case(name)
    x = ref.nchw_to_nhwc(case.io["x"].astype(np.float64))
    K = case.base_kernel("conv")
    b = case.base["conv.bias"].astype(np.float64)
    t = case.tensors("conv")
    base = ref.conv2d_nhwc(x, K, b, padding=1)
    np.testing.assert_allclose(ref.nhwc_to_nchw(base), case.io["y_base"], rtol=RTOL, atol=ATOL)
    if case.peft_type == "LORA":
        # unmerged LoRA conv path: conv with lora_A, then 1x1 conv (= matmul) with lora_B
        A = t["lora_A"].transpose(2, 3, 1, 0)
        B = t["lora_B"][:, :, 0, 0].T
        y = base + ref.conv2d_nhwc(x, A, padding=1) @ B * case.scaling("conv")
    else:
        y = base + ref.conv2d_nhwc(x, adapter_delta(case, "conv"), padding=1)
    np.testing.assert_allclose(ref.nhwc_to_nchw(y), case.io["y_adapted"], rtol=RTOL, atol=ATOL)


def test_embedding_adapted_output():
    case = Case("lora_embedding")
    ids = case.io["ids"]
    assert ids.dtype == np.int64
    t = case.tensors("emb")
    assert set(t) == {"lora_embedding_A", "lora_embedding_B"}
    E = case.base["emb.weight"].astype(np.float64)
    e = ref.lora_embed_forward(
        ids, E, t["lora_embedding_A"].T, t["lora_embedding_B"].T, case.scaling("emb")
    )
    Wh = ref.torch_to_flax_linear(case.base["head.weight"])
    y = ref.dense(e, Wh, case.base["head.bias"])
    np.testing.assert_allclose(y, case.io["y_adapted"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        ref.dense(E[ids], Wh, case.base["head.bias"]), case.io["y_base"], rtol=RTOL, atol=ATOL
    )


def test_rslora_patterns_resolved():
    case = Case("lora_rslora_patterns")
    assert case.r_alpha("fc1") == (4, 3)
    assert case.r_alpha("fc2") == (2, 8)
    assert case.tensors("fc1")["lora_A"].shape == (4, 12)
    assert case.tensors("fc2")["lora_A"].shape == (2, 20)
    assert case.scaling("fc1") == pytest.approx(3 / 2)
    assert case.scaling("fc2") == pytest.approx(8 / 2**0.5)


@pytest.mark.parametrize(
    "name",
    [n for n in ALL_CASES if n.startswith("lokr") or n == "llama_lokr"],
)
def test_lokr_factor_shapes(name):
    case = Case(name)
    for module in case.modules():
        W = case.base[module + ".weight"]
        r, _ = case.r_alpha(module)
        info = ref.lokr_shapes(
            W.shape[1],
            W.shape[0],
            r,
            case.config["decompose_both"],
            case.config["decompose_factor"],
        )
        t = case.tensors(module)
        a, b, c, d = info["a"], info["b"], info["c"], info["d"]
        if info["use_w1"]:
            assert t["lokr_w1"].shape == (a, c)
        else:
            assert t["lokr_w1_a"].shape == (a, r) and t["lokr_w1_b"].shape == (r, c)
        ks = W.shape[2:]
        if info["use_w2"]:
            assert t["lokr_w2"].shape == (b, d, *ks)
        elif "lokr_t2" in t:
            assert t["lokr_t2"].shape == (r, r, *ks)
            assert t["lokr_w2_a"].shape == (r, b) and t["lokr_w2_b"].shape == (r, d)
        else:
            assert t["lokr_w2_a"].shape == (b, r)
            assert t["lokr_w2_b"].shape == (r, d * int(np.prod(ks, dtype=int)))


def test_ia3_shapes_and_feedforward():
    case = Case("ia3_mlp")
    assert case.tensors("fc1")["ia3_l"].shape == (20, 1)  # non-ff: [out, 1]
    assert case.tensors("fc2")["ia3_l"].shape == (1, 20)  # ff: [1, in]
    assert not case.is_feedforward("fc1") and case.is_feedforward("fc2")
    # non-ff scales the bias, ff leaves it
    assert not np.allclose(case.merged["fc1.bias"], case.base["fc1.bias"])
    np.testing.assert_array_equal(case.merged["fc2.bias"], case.base["fc2.bias"])


def test_dora_magnitude_and_bias():
    case = Case("dora_linear")
    for m in ("fc1", "fc2"):
        t = case.tensors(m)
        assert t["lora_magnitude_vector"].shape == (case.base[m + ".weight"].shape[0],)
        np.testing.assert_array_equal(case.merged[m + ".bias"], case.base[m + ".bias"])


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_fixture_layout(name):
    case = Case(name)
    cfg = json.loads((FIX / name / "llama_config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2
    assert cfg["tie_word_embeddings"] is False
    ids = case.io["input_ids"]
    assert ids.shape == (2, 8) and ids.dtype == np.int64
    assert case.io["logits_adapted"].shape == (2, 8, 64)
    assert not np.allclose(case.io["logits_adapted"], case.io["logits_base"])
    targets = (
        ("k_proj", "v_proj", "down_proj")
        if name == "llama_ia3"
        else ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    expected = sorted(f"model.layers.{i}.{p}.{t}" for i in range(2) for p in ("self_attn", "mlp")
                      for t in targets if (t == "down_proj") == (p == "mlp"))  # fmt: skip
    assert case.modules() == expected
