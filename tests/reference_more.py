"""Independent NumPy references for HF PEFT 0.21's OFT, VeRA and AdaLoRA.

Pure NumPy (no jax, no torch, no peftjax), written from PEFT's formulas and checked against
fixtures made by real PEFT (``tests/test_reference_more.py``, fixtures from
``tests/fixtures/make_peft_fixtures_more.py``).

Everything here is in **torch layout**, exactly as PEFT stores it: Linear ``W [out, in]`` with
``y = x W^T + b``, Conv2d ``W [out, in, kh, kw]`` with NCHW activations, Embedding ``E [V, D]``,
and the adapter tensors as saved in ``adapter_model.safetensors`` (``oft_R.weight [n, b(b-1)/2]``,
``vera_A [r, in_max]``, ``vera_B [out_max, r]``, ``vera_lambda_b [out]``, ``vera_lambda_d [r]``,
``lora_A [r, in]``, ``lora_B [out, r]``, ``lora_E [r, 1]``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# =========================================================================== generic layers


def linear(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """torch ``Linear``: ``x W^T + b`` with ``W [out, in]``."""
    y = x @ W.T
    return y if b is None else y + b


def conv2d_nchw(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None, padding: int = 0
) -> np.ndarray:
    """torch ``Conv2d``, stride 1: ``x [N, C, H, W]``, ``W [O, C, kh, kw]``."""
    kh, kw = W.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = unfold_nchw(xp, kh, kw)  # [N, Ho, Wo, C*kh*kw]
    y = cols @ W.reshape(W.shape[0], -1).T  # [N, Ho, Wo, O]
    if b is not None:
        y = y + b
    return y.transpose(0, 3, 1, 2)


def unfold_nchw(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Patches (stride 1, no padding): ``[N, C, H, W] -> [N, Ho, Wo, C*kh*kw]``, the last axis
    ordered ``(c, i, j)`` like a flattened torch conv weight."""
    n, c, h, w = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    out = np.empty((n, ho, wo, c, kh, kw), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out[..., i, j] = x[:, :, i : i + ho, j : j + wo].transpose(0, 2, 3, 1)
    return out.reshape(n, ho, wo, c * kh * kw)


def fold_nchw(cols: np.ndarray, c: int, h: int, w: int, kh: int, kw: int) -> np.ndarray:
    """``F.fold`` (stride 1, no padding): ``cols [N, C*kh*kw, L]`` with the channel axis ordered
    ``(c, i, j)`` and ``L = Ho*Wo`` row-major -> ``[N, C, H, W]``; overlapping entries are
    **summed**."""
    n = cols.shape[0]
    ho, wo = h - kh + 1, w - kw + 1
    p = cols.reshape(n, c, kh, kw, ho, wo)
    out = np.zeros((n, c, h, w), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + ho, j : j + wo] += p[:, :, i, j]
    return out


# =========================================================================== OFT


def oft_adjust(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest to ``value``.

    ``value >= in_features`` gives ``in_features``. Otherwise the smallest divisor above and the
    largest divisor below ``value`` are found and the nearer wins; **ties go to the lower one**
    (12, 5 -> 4; 64, 24 -> 16; 64, 12 -> 8).
    """
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def oft_resolve(in_features: int, r: int = 0, oft_block_size: int = 0) -> tuple[int, int, bool]:
    """``(n_blocks, block_size, adjusted)`` as ``OFTLayer.update_layer`` resolves them.

    Exactly one of ``r`` / ``oft_block_size`` is non-zero. The given one is moved with
    `oft_adjust` when it does not divide ``in_features`` (or exceeds it; PEFT then warns
    "Invalid `oft_block_size` (5)! Adjusted `oft_block_size` to (4)." / "Invalid `r` ...").
    ``in_features`` is ``in`` for Linear, ``embedding_dim`` for Embedding and
    ``in * k0 * k0`` for Conv2d (`oft_conv_in_features`).
    """
    if (r == 0) == (oft_block_size == 0):
        raise ValueError("exactly one of `r` and `oft_block_size` must be non-zero")
    if r == 0:
        b = oft_block_size
        adjusted = in_features % b != 0 or b > in_features
        if adjusted:
            b = oft_adjust(in_features, b)
        return in_features // b, b, adjusted
    adjusted = in_features % r != 0 or r > in_features
    if adjusted:
        r = oft_adjust(in_features, r)
    return r, in_features // r, adjusted


def oft_conv_in_features(in_channels: int, kernel_size: tuple[int, int]) -> int:
    """Rotated dimension of a Conv2d: ``in * k0 * k0`` (PEFT uses ``kernel_size[0]`` twice)."""
    return in_channels * kernel_size[0] * kernel_size[0]


def oft_n_elements(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def oft_block_size_from_elements(n_elements: int) -> int:
    """Inverse of ``b (b - 1) / 2`` (the width of ``oft_R.weight``)."""
    b = int(round((1 + math.sqrt(1 + 8 * n_elements)) / 2))
    if oft_n_elements(b) != n_elements:
        raise ValueError(f"{n_elements} is not b(b-1)/2 for an integer b")
    return b


def skew_from_vec(v: np.ndarray, block_size: int) -> np.ndarray:
    """``[n, b(b-1)/2] -> [n, b, b]``: each row fills the strict upper triangle in row-major
    order ((0,1), (0,2), ..., (0,b-1), (1,2), ...) and ``Q = U - U^T``."""
    v = np.asarray(v)
    rows, cols = np.triu_indices(block_size, 1)
    U = np.zeros((v.shape[0], block_size, block_size), dtype=v.dtype)
    U[:, rows, cols] = v
    return U - U.transpose(0, 2, 1)


def vec_from_skew(Q: np.ndarray) -> np.ndarray:
    """Strict upper triangle of ``[n, b, b]`` in row-major order (inverse of `skew_from_vec`)."""
    rows, cols = np.triu_indices(Q.shape[-1], 1)
    return Q[:, rows, cols]


def cayley_exact(Q: np.ndarray) -> np.ndarray:
    """``R = (I - Q)(I + Q)^{-1}`` per block (``use_cayley_neumann=False``)."""
    eye = np.eye(Q.shape[-1], dtype=Q.dtype)
    # X (I + Q) = I - Q  <=>  (I + Q)^T X^T = (I - Q)^T
    Xt = np.linalg.solve((eye + Q).transpose(0, 2, 1), (eye - Q).transpose(0, 2, 1))
    return Xt.transpose(0, 2, 1)


def cayley_neumann(Q: np.ndarray, num_terms: int = 5) -> np.ndarray:
    """PEFT's Neumann series (the default): ``I + 2Q + 2Q^2 + ... + 2Q^{m-2} + Q^{m-1}``.

    m = 1: ``I``; m = 2: ``I + 2Q``; m = 3 **and** m = 4: ``I + 2Q + 2Q^2 + Q^3`` (PEFT's loop
    ``range(3, m - 1)`` is empty for both); m = 5: ``I + 2Q + 2Q^2 + 2Q^3 + Q^4``. It
    approximates ``(I + Q)(I - Q)^{-1}`` = ``cayley_exact(Q)^T``: the two modes rotate in
    opposite directions for the same parameters.
    """
    b = Q.shape[-1]
    R = np.broadcast_to(np.eye(b, dtype=Q.dtype), Q.shape).copy()
    if num_terms > 1:
        R = R + 2.0 * Q
        if num_terms > 2:
            P = Q @ Q
            R = R + 2.0 * P
            for _ in range(3, num_terms - 1):
                P = P @ Q
                R = R + 2.0 * P
            P = P @ Q
            R = R + P
    return R


def coft_project(v: np.ndarray, block_size: int, eps: float) -> np.ndarray:
    """COFT's ``_project_batch`` on the stored parameter ``[n, b(b-1)/2]``.

    ``eps' = eps / sqrt(n)`` (n = rows of ``oft_R.weight``, 1 with ``block_share``); each block
    with ``||Q_i||_F > eps'`` becomes ``eps' Q_i / ||Q_i||_F`` (``||Q_i||_F = sqrt(2) ||v_i||``),
    the others are kept. PEFT rewrites the parameter in place with this before every forward and
    merge (so a saved COFT adapter holds projected values).
    """
    v = np.asarray(v)
    Q = skew_from_vec(v, block_size)
    eps_s = eps / math.sqrt(Q.shape[0])
    norm = np.sqrt(np.sum(Q * Q, axis=(1, 2), keepdims=True))
    keep = norm <= eps_s
    out = np.where(keep, Q, eps_s * (Q / np.where(keep, 1.0, norm)))
    return vec_from_skew(out)


def oft_blocks(
    v: np.ndarray,
    block_size: int | None = None,
    use_cayley_neumann: bool = True,
    num_cayley_neumann_terms: int = 5,
    coft: bool = False,
    eps: float = 6e-5,
) -> np.ndarray:
    """Rotation blocks ``[n, b, b]`` from ``oft_R.weight [n, b(b-1)/2]`` (COFT projection first)."""
    v = np.asarray(v)
    if block_size is None:
        block_size = oft_block_size_from_elements(v.shape[1])
    if coft:
        v = coft_project(v, block_size, eps)
    Q = skew_from_vec(v, block_size)
    if use_cayley_neumann:
        return cayley_neumann(Q, num_cayley_neumann_terms)
    return cayley_exact(Q)


def block_diag(blocks: np.ndarray, n_blocks: int | None = None) -> np.ndarray:
    """``R_bd = blockdiag(R_1, ..., R_n)``; a single block (``block_share``) is repeated
    ``n_blocks`` times (``n_blocks = in_features / b``)."""
    k, b, _ = blocks.shape
    n = k if n_blocks is None else n_blocks
    if k != n and k != 1:
        raise ValueError(f"{k} blocks for {n} positions")
    out = np.zeros((n * b, n * b), dtype=blocks.dtype)
    for i in range(n):
        out[i * b : (i + 1) * b, i * b : (i + 1) * b] = blocks[0 if k == 1 else i]
    return out


def oft_rotation(v: np.ndarray, in_features: int, block_share: bool = False, **kw) -> np.ndarray:
    """Full ``R_bd [in, in]`` of one OFT layer from its stored parameter (kw: `oft_blocks`)."""
    blocks = oft_blocks(v, **kw)
    return block_diag(blocks, in_features // blocks.shape[-1] if block_share else None)


def oft_rotate_input(x: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """``x R_bd``: each length-b chunk of the last axis times its block (PEFT's einsum
    ``...rk,rkc->...rc``)."""
    return x @ R_bd


def oft_linear_forward(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None, R_bd: np.ndarray
) -> np.ndarray:
    """OFT Linear: ``base(x R_bd) = x R_bd W^T + b`` (the bias is not rotated)."""
    return linear(oft_rotate_input(x, R_bd), W, b)


def oft_linear_merge(W: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """``W' = (R_bd W^T)^T = W R_bd^T`` (``[out, in]``)."""
    return W @ R_bd.T


def oft_linear_unmerge(W_merged: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """PEFT's unmerge: ``W = (inv(R_bd) W'^T)^T`` -- an inverse, not a transpose."""
    return (np.linalg.inv(R_bd) @ W_merged.T).T


def oft_embedding_forward(ids: np.ndarray, E: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """OFT Embedding: ``E[ids] R_bd`` (rotates the embedding_dim axis of the looked-up rows)."""
    return E[ids] @ R_bd


def oft_embedding_merge(E: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """``E' = E R_bd`` (no transpose, unlike Linear)."""
    return E @ R_bd


def oft_embedding_unmerge(E_merged: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    return E_merged @ np.linalg.inv(R_bd)


def oft_conv2d_merge(W: np.ndarray, R_bd: np.ndarray) -> np.ndarray:
    """PEFT's Conv2d merge: ``W.view(out, in*k*k) @ R_bd^T`` reshaped back; the rotation acts on
    the flattened ``(in, kh, kw)`` axis (c-major, like `unfold_nchw`'s last axis)."""
    o = W.shape[0]
    return (W.reshape(o, -1) @ R_bd.T).reshape(W.shape)


def oft_conv2d_forward_correct(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None, R_bd: np.ndarray, padding: int = 0
) -> np.ndarray:
    """The mathematically consistent OFT conv: the base conv with the merged kernel
    (equivalently, every *padded* input patch ``p`` of the conv is replaced by ``p R_bd``)."""
    return conv2d_nchw(x, oft_conv2d_merge(W, R_bd), b, padding)


def oft_conv2d_forward_peft(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None, R_bd: np.ndarray, padding: int = 0
) -> np.ndarray:
    """What PEFT 0.21's OFT ``Conv2d.forward`` computes (wrong for k > 1).

    1. ``_unfold``: patches of ``x`` with stride 1 and **no padding**, ``[N*Ho*Wo, C*kh*kw]``
       ordered ``(c, i, j)``; each patch is rotated, ``p R_bd``.
    2. ``_fold``: the rotated patches are viewed as ``[N, Ho, Wo, C, kh, kw]``, permuted to
       ``[N, C, Ho, Wo, kh, kw]`` and then **reinterpreted** (``.view``) as
       ``[N, C*kh*kw, Ho*Wo]``, so per channel the ``(ho, wo, i, j)``-ordered values are read as
       if ordered ``(i, j, ho, wo)``; ``F.fold`` then sums the overlapping patches back into an
       ``[N, C, H, W]`` image.
    3. The *base* conv (its own padding and bias) runs on that image.

    For k = 1 the view is harmless and there are no overlaps, so this equals
    `oft_conv2d_forward_correct`; for k > 1 it is neither the identity at R = I nor related to
    PEFT's own merge.
    """
    n, c, h, w = x.shape
    kh = kw = W.shape[2]  # PEFT takes the patch size from kernel_size (square kernels here)
    ho, wo = h - kh + 1, w - kw + 1
    cols = unfold_nchw(x, kh, kw) @ R_bd  # [N, Ho, Wo, C*kh*kw]
    p = cols.reshape(n, ho, wo, c, kh, kw).transpose(0, 3, 1, 2, 4, 5)
    scrambled = np.ascontiguousarray(p).reshape(n, c * kh * kw, ho * wo)
    return conv2d_nchw(fold_nchw(scrambled, c, h, w, kh, kw), W, b, padding)


# =========================================================================== VeRA


def mt19937_words(seed: int, n: int) -> np.ndarray:
    """The first ``n`` 32-bit outputs of MT19937 seeded by ``init_genrand(seed)`` -- the stream
    of ``torch.Generator().manual_seed(seed)`` on CPU (as uint64)."""
    return np.random.RandomState(seed).randint(0, 2**32, size=n, dtype=np.uint64)


def torch_uniform_from_words(words: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``Tensor.uniform_(lo, hi)`` (float32, CPU) from its 32-bit words.

    ``u = (word & 0xFFFFFF) * 2^-24``; ``value = fl32(u * fl32(hi - lo) + lo)`` computed in
    float64 with one final rounding; ``lo``, ``hi`` are first rounded to float32.
    """
    lo32, hi32 = np.float32(lo), np.float32(hi)
    u = (words & np.uint64(0xFFFFFF)).astype(np.float64) * 2.0**-24
    return (u * np.float64(hi32 - lo32) + np.float64(lo32)).astype(np.float32)


def vera_kaiming_bound(fan_in: int) -> float:
    """PEFT's ``_kaiming_init``: gain sqrt(2), ``bound = sqrt(3) * sqrt(2) / sqrt(fan_in)``."""
    return math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))


def vera_projections(seed: int, r: int, in_max: int, out_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit-exact ``(vera_A [r, in_max], vera_B [out_max, r])`` for ``projection_prng_key=seed``.

    One generator: A's ``r*in_max`` words first (row-major, fan_in = in_max), then B's
    (fan_in = r).
    """
    words = mt19937_words(seed, r * in_max + out_max * r)
    ba, bb = vera_kaiming_bound(in_max), vera_kaiming_bound(r)
    A = torch_uniform_from_words(words[: r * in_max], -ba, ba).reshape(r, in_max)
    B = torch_uniform_from_words(words[r * in_max :], -bb, bb).reshape(out_max, r)
    return A, B


def vera_find_dims(shapes: list[tuple[int, int]]) -> tuple[int, int]:
    """``(out_max, in_max)``: elementwise max of the targets' ``(out, in)``."""
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def vera_delta(
    A: np.ndarray,
    B: np.ndarray,
    lambda_b: np.ndarray,
    lambda_d: np.ndarray,
    in_features: int,
    out_features: int,
) -> np.ndarray:
    """``(lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])``, ``[out, in]``."""
    return (lambda_b[:, None] * B[:out_features, :]) @ (lambda_d[:, None] * A[:, :in_features])


def vera_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    lambda_b: np.ndarray,
    lambda_d: np.ndarray,
) -> np.ndarray:
    """``base(x) + lambda_b * ((lambda_d * (x A_s^T)) B_s^T)`` with the shared A/B sliced to the
    layer: ``A_s = A[:, :in]``, ``B_s = B[:out, :]``."""
    out_f, in_f = W.shape
    h = (x @ A[:, :in_f].T) * lambda_d
    return linear(x, W, b) + lambda_b * (h @ B[:out_f, :].T)


def vera_merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, lambda_b: np.ndarray, lambda_d: np.ndarray
) -> np.ndarray:
    return W + vera_delta(A, B, lambda_b, lambda_d, W.shape[1], W.shape[0])


def vera_unmerge(
    W_merged: np.ndarray, A: np.ndarray, B: np.ndarray, lambda_b: np.ndarray, lambda_d: np.ndarray
) -> np.ndarray:
    return W_merged - vera_delta(A, B, lambda_b, lambda_d, W_merged.shape[1], W_merged.shape[0])


# =========================================================================== AdaLoRA


def adalora_scaling(lora_alpha: float, init_r: int) -> float:
    """``s / (ranknum + 1e-5)`` with ``s = lora_alpha`` (``init_r`` if alpha <= 0) and
    ``ranknum = init_r`` **for ever** (PEFT never updates it; a pruned or reloaded module keeps
    it), so this is alpha / init_r, not alpha / current rank."""
    s = lora_alpha if lora_alpha > 0 else float(init_r)
    return s / (float(init_r) + 1e-5)


def adalora_delta(A: np.ndarray, B: np.ndarray, E: np.ndarray, scaling: float) -> np.ndarray:
    """``B (A * E) * c``: ``A [r, in]``, ``E [r, 1]``, ``B [out, r]`` -> ``[out, in]``."""
    return (B @ (A * E)) * scaling


def adalora_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    E: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """``base(x) + (x (A * E)^T B^T) * c`` (dropout off)."""
    return linear(x, W, b) + (x @ (A * E).T @ B.T) * scaling


def adalora_merge(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, E: np.ndarray, scaling: float
) -> np.ndarray:
    return W + adalora_delta(A, B, E, scaling)


def adalora_unmerge(
    W_merged: np.ndarray, A: np.ndarray, B: np.ndarray, E: np.ndarray, scaling: float
) -> np.ndarray:
    return W_merged - adalora_delta(A, B, E, scaling)


def adalora_orth_reg(As: list[np.ndarray], Bs: list[np.ndarray]) -> float:
    """R = mean over every ``lora_A`` and ``lora_B`` of ``||A A^T - I_r||_F`` resp.
    ``||B^T B - I_r||_F`` (Frobenius norm, **not squared**). PEFT adds ``orth_reg_weight * R`` to
    the loss only when the model output has a ``loss`` (``task_type`` set)."""
    terms = [np.linalg.norm(A @ A.T - np.eye(A.shape[0])) for A in As]
    terms += [np.linalg.norm(B.T @ B - np.eye(B.shape[1])) for B in Bs]
    return float(np.mean(terms)) if terms else 0.0


def adalora_resize(
    A: np.ndarray, B: np.ndarray, E: np.ndarray, keep: list[bool] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slicing by a ``rank_pattern`` entry as ``save_pretrained`` does: ``A[m], B[:, m], E[m]``."""
    m = np.asarray(keep, dtype=bool)
    return A[m], B[:, m], E[m]


class AdaLoraSchedule(NamedTuple):
    """The RankAllocator's config fields (``AdaLoraConfig`` names)."""

    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85


def adalora_budget(
    step: int,
    init_bgt: int,
    target_bgt: int,
    tinit: int,
    tfinal: int,
    total_step: int,
    deltaT: int,
) -> tuple[int, bool]:
    """``RankAllocator.budget_schedule``: ``(budget, mask_ind)``.

    ``step <= tinit``: ``(init_bgt, False)``; ``step > total_step - tfinal``:
    ``(target_bgt, True)``; otherwise ``mu = 1 - (step - tinit) / (total_step - tfinal - tinit)``,
    ``budget = int((init_bgt - target_bgt) * mu^3 + target_bgt)`` and ``mask_ind = step % deltaT
    == 0``. (At ``step == total_step - tfinal`` this gives ``target_bgt`` and the model forces
    the mask whatever ``mask_ind`` says.)
    """
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul**3) + target_bgt), step % deltaT == 0


class AllocatorState(NamedTuple):
    """Importance EMAs per module and parameter (``{module: {"lora_A": ..., ...}}``, empty after a
    reset) and the current rank pattern (``{module: [bool] * init_r}`` or None)."""

    ipt_avg: dict
    ipt_unc: dict
    rank_pattern: dict | None = None


def allocator_init() -> AllocatorState:
    return AllocatorState({}, {}, None)


class AllocatorStep(NamedTuple):
    """Result of `allocator_step`."""

    state: AllocatorState
    params: dict  # {module: {"lora_A", "lora_B", "lora_E"}} after masking
    budget: int
    mask_flag: bool  # True when E was masked this step (mask step, final mask or re-zeroing)
    rank_pattern: dict | None  # the pattern applied this step, None when nothing was masked
    scores: dict | None  # {module: [r] triplet scores} when masked to a budget
    threshold: float | None


_LORA = ("lora_A", "lora_B", "lora_E")


def allocator_scores(state: AllocatorState) -> dict[str, np.ndarray]:
    """Triplet score ``S_E[i] + (mean_j S_A[i, j] + mean_k S_B[k, i])`` with ``S = avg * unc``
    (float32, PEFT's order of operations)."""
    out = {}
    for m in state.ipt_avg:
        S = {p: state.ipt_avg[m][p] * state.ipt_unc[m][p] for p in _LORA}
        sA = np.mean(S["lora_A"], axis=1, dtype=np.float32)
        sB = np.mean(S["lora_B"], axis=0, dtype=np.float32)
        out[m] = (S["lora_E"].reshape(-1) + (sA + sB)).astype(np.float32)
    return out


def allocator_step(
    state: AllocatorState, params: dict, grads: dict, t: int, sched: AdaLoraSchedule
) -> AllocatorStep:
    """One ``AdaLoraModel.update_and_allocate(t)``, called after ``optimizer.step()`` with the
    post-step params and the (pre-step) gradients of that step. Pure: inputs are not changed.

    ``params`` / ``grads``: ``{module: {"lora_A" [r, in], "lora_B" [out, r], "lora_E" [r, 1]}}``
    (float32). ``init_bgt`` = sum of rows of all ``lora_A``; ``target_bgt = target_r * n_modules``.

    * ``t < T - tfinal``: importance update for A, B and E: ``I = |p * g|``,
      ``avg <- b1 avg + (1 - b1) I``, ``unc <- b2 unc + (1 - b2) |I - avg|`` (new avg); then, if
      the schedule's ``mask_ind``, mask to the budget.
    * ``t == T - tfinal``: no update; forced mask at the schedule's budget (= target_bgt) with
      the importance left by the previous step; that pattern is kept; the EMAs are reset.
    * ``t > T - tfinal``: E rows outside the kept pattern are re-zeroed.

    Masking to a budget: ``thr`` = the ``(init_bgt - budget)``-th smallest triplet score over all
    modules (`allocator_scores`); ``E[i] <- 0`` where ``score <= thr`` (ties mask more); A and B
    are untouched; ``rank_pattern[module] = score > thr``.
    """
    T, tfinal = sched.total_step, sched.tfinal
    init_bgt = sum(int(p["lora_A"].shape[0]) for p in params.values())
    target_bgt = sched.target_r * len(params)
    budget, mask_ind = adalora_budget(t, init_bgt, target_bgt, sched.tinit, tfinal, T, sched.deltaT)
    new_params = {m: {k: np.array(v, copy=True) for k, v in p.items()} for m, p in params.items()}
    avg = {m: dict(v) for m, v in state.ipt_avg.items()}
    unc = {m: dict(v) for m, v in state.ipt_unc.items()}
    pattern = state.rank_pattern

    if t < T - tfinal:
        for m, p in params.items():
            for k in _LORA:
                ipt = np.abs(p[k] * grads[m][k]).astype(np.float32)
                a0 = avg.get(m, {}).get(k, np.zeros_like(ipt))
                u0 = unc.get(m, {}).get(k, np.zeros_like(ipt))
                a = (sched.beta1 * a0 + (1 - sched.beta1) * ipt).astype(np.float32)
                u = (sched.beta2 * u0 + (1 - sched.beta2) * np.abs(ipt - a)).astype(np.float32)
                avg.setdefault(m, {})[k] = a
                unc.setdefault(m, {})[k] = u
        do_mask = mask_ind
    elif t == T - tfinal:
        do_mask = True
    else:
        if pattern is None:
            raise ValueError("no rank_pattern to re-zero with (the final mask step never ran)")
        for m, keep in pattern.items():
            new_params[m]["lora_E"][~np.asarray(keep, bool)] = 0.0
        return AllocatorStep(
            AllocatorState(avg, unc, pattern), new_params, budget, True, pattern, None, None
        )

    if not do_mask:
        return AllocatorStep(
            AllocatorState(avg, unc, pattern), new_params, budget, False, None, None, None
        )

    scores = allocator_scores(AllocatorState(avg, unc))
    k = init_bgt - budget
    if k < 1:
        raise ValueError(f"kthvalue k = init_bgt - budget = {k} is out of range")
    allv = np.concatenate([scores[m] for m in params])
    thr = float(np.partition(allv, k - 1)[k - 1])
    pattern = {}
    for m in params:
        masked = scores[m] <= thr
        new_params[m]["lora_E"][masked] = 0.0
        pattern[m] = [bool(v) for v in ~masked]
    if t == T - tfinal:
        avg, unc = {}, {}
    return AllocatorStep(
        AllocatorState(avg, unc, pattern), new_params, budget, True, pattern, scores, thr
    )
