"""Independent NumPy reference implementations of HF PEFT's adapter math (peft 0.21).

Pure NumPy (no jax, no torch), written from PEFT's formulas and checked against fixtures made by
real PEFT (``tests/test_reference.py``), so peftjax's JAX code can be tested against them.

Layout conventions
------------------
Weights are in **Flax layout** unless a docstring says otherwise:

=====================  ===========================  ==================================
layer                  torch (PEFT) layout          Flax layout
=====================  ===========================  ==================================
Linear / Dense         ``weight [out, in]``         ``kernel [in, out]`` = ``W.T``
Conv2d / Conv          ``weight [out, in, kh, kw]`` ``kernel [kh, kw, in, out]`` =
                                                    ``W.transpose(2, 3, 1, 0)``
Embedding / Embed      ``weight [V, D]``            ``embedding [V, D]`` (unchanged)
=====================  ===========================  ==================================

LoRA factors are taken in Flax layout (mapping in each docstring). LoHa and LoKr factors are not
tied to a kernel layout, so those functions take them **exactly as stored in PEFT's
adapter_model.safetensors** (``hada_w1_a [out, r]`` ...) and return the delta in Flax layout.

Activations are channels-last (Flax): Dense input ``[..., in]``, Conv input NHWC.
"""

from __future__ import annotations

import math
import re

import numpy as np

# --------------------------------------------------------------------------- layout helpers


def torch_to_flax_linear(Wt: np.ndarray) -> np.ndarray:
    """torch ``Linear.weight [out, in]`` -> Flax ``Dense`` kernel ``[in, out]``."""
    return np.asarray(Wt).T


def flax_to_torch_linear(K: np.ndarray) -> np.ndarray:
    """Flax ``Dense`` kernel ``[in, out]`` -> torch ``Linear.weight [out, in]``."""
    return np.asarray(K).T


def torch_to_flax_conv(Wt: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight [out, in, kh, kw]`` -> Flax ``Conv`` kernel ``[kh, kw, in, out]``."""
    return np.asarray(Wt).transpose(2, 3, 1, 0)


def flax_to_torch_conv(K: np.ndarray) -> np.ndarray:
    """Flax ``Conv`` kernel ``[kh, kw, in, out]`` -> torch ``Conv2d.weight [out, in, kh, kw]``."""
    return np.asarray(K).transpose(3, 2, 0, 1)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


# --------------------------------------------------------------------------- init / config


def kaiming_uniform_bound(fan_in: int) -> float:
    """Bound of ``kaiming_uniform_(w, a=sqrt(5))``: ``U(-b, b)`` with ``b = 1/sqrt(fan_in)``.

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = sqrt(3) * gain / sqrt(fan_in). ``fan_in`` is
    ``w.shape[1] * prod(w.shape[2:])`` of the torch tensor (e.g. ``lora_A [r, in]`` -> ``in``).
    """
    return 1.0 / math.sqrt(fan_in)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. (LoHa/LoKr always use ``alpha / r``.)"""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_lookup(pattern: dict, module_path: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup: first key (dict order) with
    ``re.match(rf"(.*\\.)?({key})$", module_path)`` wins; else ``default``.

    ``module_path`` is the module name without the ``base_model.model.`` prefix.
    """
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LoKr's ``factorization``: ``(m, n)`` with ``m * n == dim``.

    If ``factor > 0`` divides ``dim``: ``(factor, dim // factor)`` (not sorted). Otherwise
    (``factor = dim`` when -1) walk the divisors ``m' > m`` of ``dim`` upwards from ``(1, dim)``,
    accepting ``(m', dim // m')`` while ``m' + dim // m'`` does not exceed the previous sum and
    ``m' <= factor``, stopping at the first rejection or once ``m >= n``; return sorted.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        cand = m + 1
        while dim % cand:
            cand += 1
        cand_n = dim // cand
        if cand + cand_n > m + n or cand > limit:
            break
        m, n = cand, cand_n
    return (m, n) if m <= n else (n, m)


# --------------------------------------------------------------------------- plain layers


def dense(x: np.ndarray, K: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``x @ K (+ b)`` with a Flax kernel ``K [in, out]``."""
    y = np.asarray(x) @ np.asarray(K)
    return y if b is None else y + b


def conv2d_nhwc(
    x: np.ndarray,
    K: np.ndarray,
    b: np.ndarray | None = None,
    stride: int = 1,
    padding: int = 0,
) -> np.ndarray:
    """Cross-correlation like ``torch.nn.functional.conv2d`` / ``flax.linen.Conv``.

    ``x [N, H, W, C_in]``, ``K [kh, kw, C_in, C_out]`` (Flax layout), symmetric zero ``padding``.
    """
    x = np.asarray(x)
    K = np.asarray(K)
    kh, kw, _, c_out = K.shape
    if padding:
        x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    n, h, w, _ = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    y = np.zeros((n, ho, wo, c_out), dtype=np.result_type(x, K))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            y += patch @ K[i, j]
    return y if b is None else y + b


# --------------------------------------------------------------------------- LoRA


def lora_delta(A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """LoRA Dense delta ``[in, out] = scaling * A @ B``.

    ``A [in, r] = lora_A.weight.T`` (torch ``[r, in]``), ``B [r, out] = lora_B.weight.T`` (torch
    ``[out, r]``). Equals ``((lora_B @ lora_A) * scaling).T`` of PEFT's ``[out, in]`` delta.
    """
    return scaling * (np.asarray(A) @ np.asarray(B))


def lora_forward(
    x: np.ndarray,
    K: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """Unmerged LoRA Dense forward: ``x @ K + b + (x @ A @ B) * scaling`` (no dropout)."""
    x = np.asarray(x)
    return dense(x, K, b) + (x @ A @ B) * scaling


def lora_conv_delta(A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """LoRA Conv delta ``[kh, kw, in, out]``.

    ``A [kh, kw, in, r]`` = torch ``lora_A.weight [r, in, kh, kw]`` ``.transpose(2, 3, 1, 0)``;
    ``B [r, out]`` = torch ``lora_B.weight [out, r, 1, 1]`` ``[:, :, 0, 0].T``.
    PEFT: ``einsum('or,rikl->oikl', B, A) * s`` in torch layout.
    """
    return scaling * np.einsum("hwir,ro->hwio", np.asarray(A), np.asarray(B))


def lora_embed_delta(A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """LoRA Embed delta ``[V, D] = scaling * A @ B``.

    ``A [V, r]`` = torch ``lora_embedding_A [r, V]`` ``.T``; ``B [r, D]`` = torch
    ``lora_embedding_B [D, r]`` ``.T``. PEFT: ``(B_t @ A_t).T * s``.
    """
    return scaling * (np.asarray(A) @ np.asarray(B))


def lora_embed_forward(
    ids: np.ndarray, E: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> np.ndarray:
    """Unmerged LoRA Embed forward: ``E[ids] + (A[ids] @ B) * scaling`` (layouts as above)."""
    ids = np.asarray(ids)
    return np.asarray(E)[ids] + (np.asarray(A)[ids] @ B) * scaling


# --------------------------------------------------------------------------- DoRA


def dora_weight_norm(W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float) -> np.ndarray:
    """``||W + s * A @ B||`` over the input axis, one value per output unit: ``[out]``.

    Flax layout ``W [in, out]`` (norm over axis 0) == PEFT's row norm of ``W_t [out, in]``.
    """
    return np.linalg.norm(np.asarray(W) + lora_delta(A, B, scaling), axis=0)


def dora_merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, m: np.ndarray
) -> np.ndarray:
    """DoRA merged Dense kernel ``[in, out]``: ``(m / ||W + dW||)[None, :] * (W + dW)``.

    ``W [in, out]``, ``A [in, r]``, ``B [r, out]`` (as :func:`lora_delta`), ``m [out]`` =
    ``lora_magnitude_vector`` (torch ``[out]``). ``dW = s * A @ B``. The bias is not changed.
    """
    V = np.asarray(W) + lora_delta(A, B, scaling)
    return V * (np.asarray(m).reshape(-1) / np.linalg.norm(V, axis=0))[None, :]


def dora_forward(
    x: np.ndarray,
    W: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    scaling: float,
    m: np.ndarray,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Unmerged DoRA Dense forward, PEFT's formula (bias not scaled).

    ``g = m / ||W + s * A @ B||`` (norm per output unit; detached from the gradient in PEFT),
    ``y = x @ W + bias + (g - 1) * (x @ W) + g * (x @ A @ B) * s``.
    """
    x = np.asarray(x)
    g = np.asarray(m).reshape(-1) / dora_weight_norm(W, A, B, scaling)
    base = x @ W
    y = base + (g - 1.0) * base + g * (x @ A @ B) * scaling
    return y if bias is None else y + bias


# --------------------------------------------------------------------------- LoHa


def loha_delta(
    w1a: np.ndarray, w1b: np.ndarray, w2a: np.ndarray, w2b: np.ndarray, scaling: float
) -> np.ndarray:
    """LoHa Dense delta in Flax layout ``[in, out]``.

    Factors as PEFT stores them: ``hada_w1_a [out, r]``, ``hada_w1_b [r, in]``,
    ``hada_w2_a [out, r]``, ``hada_w2_b [r, in]``. PEFT (torch ``[out, in]``):
    ``((w1a @ w1b) * (w2a @ w2b)) * s``; returned transposed.
    """
    return (((w1a @ w1b) * (w2a @ w2b)) * scaling).T


def loha_conv_delta(
    w1a: np.ndarray,
    w1b: np.ndarray,
    w2a: np.ndarray,
    w2b: np.ndarray,
    scaling: float,
    kernel_size: tuple[int, int],
) -> np.ndarray:
    """LoHa Conv delta (no effective decomposition), Flax layout ``[kh, kw, in, out]``.

    ``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]`` (same for w2): the torch product
    ``[out, in*kh*kw]`` is reshaped to ``[out, in, kh, kw]`` and transposed to Flax.
    """
    out = w1a.shape[0]
    kh, kw = kernel_size
    d = ((w1a @ w1b) * (w2a @ w2b)) * scaling
    return torch_to_flax_conv(d.reshape(out, -1, kh, kw))


def loha_rebuild_cp(t: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """PEFT's CP rebuild, torch layout ``[out, in, kh, kw]``.

    ``einsum('ijkl,jr,ip->prkl', t [r, r, kh, kw], wb [r, in], wa [r, out])``.
    """
    return np.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def loha_conv_effective_delta(
    t1: np.ndarray,
    w1a: np.ndarray,
    w1b: np.ndarray,
    t2: np.ndarray,
    w2a: np.ndarray,
    w2b: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """LoHa Conv delta with ``use_effective_conv2d``, Flax layout ``[kh, kw, in, out]``.

    ``hada_t1, hada_t2 [r, r, kh, kw]``, ``hada_w1_a, hada_w2_a [r, out]``,
    ``hada_w1_b, hada_w2_b [r, in]``; torch ``dW = R1 * R2 * s`` with ``R = loha_rebuild_cp``.
    """
    d = loha_rebuild_cp(t1, w1a, w1b) * loha_rebuild_cp(t2, w2a, w2b) * scaling
    return torch_to_flax_conv(d)


# --------------------------------------------------------------------------- LoKr


def lokr_shapes(
    in_dim: int, out_dim: int, r: int, decompose_both: bool = False, decompose_factor: int = -1
) -> dict:
    """Which LoKr factors PEFT creates: ``(a, b) = factorization(out)``, ``(c, d) =
    factorization(in)``; ``use_w1 = not (decompose_both and r < max(a, c) / 2)``,
    ``use_w2 = not (r < max(b, d) / 2)``. (Conv: ``in_dim`` = in_channels // groups.)"""
    a, b = factorization(out_dim, decompose_factor)
    c, d = factorization(in_dim, decompose_factor)
    return {
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "use_w1": not (decompose_both and r < max(a, c) / 2),
        "use_w2": not (r < max(b, d) / 2),
    }


def lokr_w1(w1=None, w1_a=None, w1_b=None) -> np.ndarray:
    """``w1 [a, c]`` = ``lokr_w1``, or ``lokr_w1_a [a, r] @ lokr_w1_b [r, c]``."""
    return np.asarray(w1) if w1 is not None else np.asarray(w1_a) @ np.asarray(w1_b)


def lokr_w2(w2=None, w2_a=None, w2_b=None, t2=None) -> np.ndarray:
    """``w2`` in PEFT layout.

    ``lokr_w2`` (``[b, d]`` Linear, ``[b, d, kh, kw]`` Conv); or ``lokr_w2_a [b, r] @ lokr_w2_b``
    (``[r, d]`` Linear, ``[r, d*kh*kw]`` Conv -> ``[b, d*kh*kw]``); or effective conv
    ``einsum('ijkl,ip,jr->prkl', lokr_t2 [r,r,kh,kw], lokr_w2_a [r,b], lokr_w2_b [r,d])``.
    """
    if w2 is not None:
        return np.asarray(w2)
    if t2 is not None:
        return np.einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b)
    return np.asarray(w2_a) @ np.asarray(w2_b)


def lokr_delta(w1: np.ndarray, w2: np.ndarray, scaling: float) -> np.ndarray:
    """LoKr Dense delta in Flax layout ``[in, out]``.

    ``w1 [a, c]``, ``w2 [b, d]`` in PEFT layout (see :func:`lokr_w1`, :func:`lokr_w2`); PEFT's
    torch delta is ``kron(w1, w2) * s`` ``[a*b, c*d] = [out, in]``; returned transposed
    (``kron(w1, w2).T == kron(w1.T, w2.T)``).
    """
    return (np.kron(w1, w2) * scaling).T


def lokr_conv_delta(
    w1: np.ndarray, w2: np.ndarray, scaling: float, kernel_size: tuple[int, int]
) -> np.ndarray:
    """LoKr Conv delta in Flax layout ``[kh, kw, in, out]``.

    ``w1 [a, c]``; ``w2`` either ``[b, d, kh, kw]`` or flattened ``[b, d*kh*kw]`` (PEFT layout).
    torch delta ``= kron(w1[:, :, None, None], w2) * s`` ``[a*b, c*d, kh, kw]``.
    """
    kh, kw = kernel_size
    w2 = np.asarray(w2).reshape(w2.shape[0], -1, kh, kw)
    d = np.kron(np.asarray(w1)[:, :, None, None], w2) * scaling
    return torch_to_flax_conv(d)


# --------------------------------------------------------------------------- IA3


def ia3_merge(W: np.ndarray, l: np.ndarray, feedforward: bool) -> np.ndarray:
    """IA3 merged Dense kernel ``[in, out]``.

    ``ia3_l`` is ``[out, 1]`` (non-feedforward) or ``[1, in]`` (feedforward) in PEFT; any shape is
    flattened. Non-ff scales output units (Flax columns), ff scales input units (Flax rows).
    """
    l = np.asarray(l).reshape(-1)
    return np.asarray(W) * (l[:, None] if feedforward else l[None, :])


def ia3_merge_bias(b: np.ndarray, l: np.ndarray, feedforward: bool) -> np.ndarray:
    """Bias after IA3 merge: ``b * l`` for non-feedforward layers, unchanged for feedforward."""
    return np.asarray(b) if feedforward else np.asarray(b) * np.asarray(l).reshape(-1)


def ia3_forward(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None, l: np.ndarray, feedforward: bool
) -> np.ndarray:
    """Unmerged IA3 Dense forward: ff ``(x * l) @ W + b``; non-ff ``(x @ W + b) * l``."""
    l = np.asarray(l).reshape(-1)
    if feedforward:
        return dense(np.asarray(x) * l, W, b)
    return dense(x, W, b) * l
