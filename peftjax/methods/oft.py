"""OFT (orthogonal fine-tuning), as HF PEFT 0.21 (``peft/tuners/oft/{config,layer}.py``).

The adapter rotates the input features of a module with a block-diagonal orthogonal matrix
``R_bd = blockdiag(R_1, ..., R_n)`` of ``n`` blocks of size ``b`` (``n * b = d``, the rotated
features: ``in`` of a dense kernel, ``in * kh * kw`` of a 2-D conv kernel, the feature width of an
embedding table).

One layer's array: ``oft_R (n, b (b - 1) / 2)`` (``(1, ...)`` with ``block_share``: one block
repeated ``n`` times), PEFT's ``oft_R.weight`` (``oft_embedding_R.weight`` for an embedding),
stored as it is (no transpose). Row ``i`` packs the strict upper triangle of ``U_i`` row-major
((0, 1), (0, 2), ..., (1, 2), ...) and ``Q_i = U_i - U_i^T`` is skew-symmetric; then

* exact Cayley (``use_cayley_neumann=False``): ``R_i = (I - Q_i)(I + Q_i)^-1``;
* Neumann (PEFT's default) with ``m = num_cayley_neumann_terms``: ``R_i = I`` (m <= 1),
  ``I + 2Q`` (m = 2), else ``I + 2Q + 2Q^2 + ... + 2Q^(m-2) + Q^(max(3, m-1))``, PEFT's loop
  exactly: m = 3 and m = 4 give the same ``I + 2Q + 2Q^2 + Q^3``. The series approximates
  ``(I + Q)(I - Q)^-1``, the *transpose* of the exact rotation: the two modes turn the other way
  for the same parameters, as in PEFT.

Forward and merge, with ``K`` the ``(in, out)`` matrix view of the kernel (PEFT's ``W^T``):

* dense: ``y = (x R_bd) K`` (+ bias, not rotated), PEFT's ``base(x R_bd)``; the rotation runs
  in the adapter's dtype and ``x R_bd`` is cast back to ``x``'s dtype before the base product,
  as PEFT. No ``R_bd K`` is built in training. Merge ``K' = R_bd K`` (PEFT ``W' = W R_bd^T``).
* embedding: ``y = E[ids] R_bd``; merge ``E' = E R_bd``.
* conv: the conv with the merged kernel ``K' = R_bd K`` on the conv matrix view, whose rows are
  ordered ``(in, kh, kw)``, the transpose of PEFT's ``weight.flatten(1)`` (so ``R_bd`` acts on the
  axis PEFT's merge rotates). For a 1x1 kernel this is PEFT's forward (each pixel's channels
  rotated, then the base conv). **For a kernel larger than 1x1 PEFT 0.21's forward is wrong**
  (it unfolds the input without padding, rotates the patches, reinterprets them with a
  ``.view`` and folds them back summing the overlaps, so it is not even the identity at
  ``R = I`` and disagrees with its own merge); peftjax computes what PEFT's merged model
  computes, the only definition consistent with the merge and with the dense rule
  (``tests/fixtures/peft/MANIFEST_MORE.md``, ``y_correct``). PEFT's conv OFT is 2-D only and
  uses ``kernel_size[0]`` twice (square kernels); other convs are refused.
* unmerge: ``K = R_bd^-1 K'`` (``E = E' R_bd^-1``) with a true inverse in float32, as PEFT's
  ``torch.linalg.inv`` (not the transpose: the Neumann series is not exactly orthogonal).

Several OFT adapters on one dense or conv module: PEFT 0.21's forward rotates the input by each
active adapter in turn (``x R_1 R_2 W^T``), but its merge applies ``W R_1^T`` then
``(.) R_2^T``, which is ``x R_2 R_1 W^T``: PEFT disagrees with itself there. peftjax folds the
adapters in the order PEFT merges them, in the forward too (``merge_and_unload`` equals
``pj.apply``); with one active OFT adapter per module, and for embeddings (where PEFT's forward
and merge agree, ``E R_1 R_2``), everything is PEFT's.

``r`` / ``oft_block_size``: exactly one is non-zero. The block size is ``oft_block_size``, or
``d / r``; a value that does not divide ``d`` (or exceeds it) moves to PEFT's nearest divisor
(ties to the smaller; ``>= d`` gives ``d``) with a ``UserWarning`` naming the module and both
sizes, per module (PEFT warns again on every load). The config keeps the requested value, as
PEFT's ``adapter_config.json`` does.

COFT (``coft=True``): before every forward and merge PEFT rewrites the parameter in place
(``no_grad``) with ``_project_batch``: with ``eps' = eps / sqrt(rows of oft_R)``, every block with
``||Q_i||_F > eps'`` becomes ``eps' Q_i / ||Q_i||_F``. Here the forward and the merge use the
projected value with a straight-through gradient (the gradient at the projected point, passed on
as the identity, which is what PEFT's in-place rewrite gives), and `Spec.constrain` is the
rewrite itself: call ``pj.constrain(params)`` after each optimizer step (and once after
``pj.inject`` / ``pj.load_pretrained`` if the initial values may lie outside the ball) and the
stored values are those PEFT trains (to float rounding; blocks within ~1e-6 outside the ball
are left as they are, `COFT_MARGIN`, so the projection is idempotent and a PEFT-saved COFT
adapter saves back bit for bit). ``save_pretrained`` writes projected values, as a PEFT adapter
saved after a forward holds. `inject` initialises COFT adapters projected.

``module_dropout`` is accepted and has **no effect**: PEFT 0.21 builds its
``MultiplicativeDropoutLayer`` but never calls it. ``init_weights=True``: zeros (``R = I``);
``False``: ``N(0, 0.1^2)``, as PEFT.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import _torch_layout as L
from ..config import (
    AdapterConfig,
    FrozenDict,
    check_bool,
    check_dropout,
    fail,
    is_int,
    is_real,
)
from ..errors import ConfigError, UnsupportedModuleError
from .base import IN, OUT, Spec, one_value, spec_fields

ARRAY = "oft_R"


# ------------------------------------------------------------------------------------ sizes


def adjust_oft_parameters(in_features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``in_features`` nearest ``value`` (ties
    to the smaller; ``value >= in_features`` gives ``in_features``)."""
    if value >= in_features:
        return in_features
    higher = value
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def resolve_blocks(d: int, r: int, oft_block_size: int) -> tuple[int, int, str | None]:
    """``(n_blocks, block_size, moved)`` as PEFT's ``update_layer`` resolves them for ``d``
    rotated features; ``moved`` names the field that was adjusted (``None`` when none was)."""
    if r == 0 and oft_block_size != 0:
        b, moved = oft_block_size, None
        if d % b != 0 or b > d:
            b, moved = adjust_oft_parameters(d, b), "oft_block_size"
        return d // b, b, moved
    n, moved = r, None
    if d % n != 0 or n > d:
        n, moved = adjust_oft_parameters(d, n), "r"
    return n, d // n, moved


def n_elements(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def _rotated_features(layout, shape) -> int:
    n_in, n_out = layout.in_out(tuple(shape))
    return n_out if layout.kind == "embed" else n_in


# ------------------------------------------------------------------------------------ math


def skew(v, block_size: int):
    """``(..., k, b(b-1)/2) -> (..., k, b, b)``: the strict upper triangle filled row-major,
    ``Q = U - U^T``."""
    rows, cols = np.triu_indices(block_size, 1)
    u = jnp.zeros((*v.shape[:-1], block_size, block_size), v.dtype)
    u = u.at[..., rows, cols].set(v)
    return u - jnp.swapaxes(u, -1, -2)


def coft_radius(eps: float, k: int) -> np.float32:
    """``eps' = eps / sqrt(k)`` as PEFT computes it in float32 (``eps * 1 / sqrt(tensor(k))``,
    i.e. ``eps * reciprocal(sqrt(k))``)."""
    return np.float32(eps) * (np.float32(1.0) / np.sqrt(np.float32(k)))


#: A block whose ``||Q_i||_F`` exceeds ``eps'`` by at most this (relative) is kept as it is. The
#: norm is a float32 sum whose rounding differs from torch's by an ulp or two, so a block PEFT left
#: exactly on the radius (every block it projected) could otherwise be rescaled by ``1 - ulp``
#: here: with the margin the projection is idempotent, a PEFT-projected adapter saves back bit
#: for bit, and the only difference from PEFT is that a block less than ~1e-6 outside the ball is
#: not pulled in by a factor within 1e-6 of 1.
COFT_MARGIN = 2.0**-20


def coft_project(v, block_size: int, eps: float):
    """PEFT's ``_project_batch`` on one layer's ``oft_R (k, b(b-1)/2)`` (or with leading stack
    axes): blocks with ``||Q_i||_F > eps' = eps / sqrt(k)`` become ``eps' Q_i / ||Q_i||_F``
    (see `COFT_MARGIN`)."""
    eps_s = coft_radius(eps, v.shape[-2])
    q = skew(v, block_size)
    norm = jnp.sqrt(jnp.sum(q * q, axis=(-2, -1)))[..., None]  # ||Q_i||_F, (..., k, 1)
    keep = norm <= jnp.asarray(eps_s * (1.0 + COFT_MARGIN), v.dtype)
    scaled = jnp.asarray(eps_s, v.dtype) * (v / jnp.where(keep, jnp.ones_like(norm), norm))
    return jnp.where(keep, v, scaled)


#: `coft_project` compiled once per shape (`pj.constrain` runs it leaf by leaf, outside `jit`)
_coft_project_jit = jax.jit(coft_project, static_argnums=(1, 2))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def coft_straight_through(v, block_size: int, eps: float):
    """`coft_project` with the identity as its derivative (PEFT's ``no_grad`` rewrite)."""
    return coft_project(v, block_size, eps)


@coft_straight_through.defjvp
def _coft_jvp(block_size, eps, primals, tangents):
    return coft_project(primals[0], block_size, eps), tangents[0]


def cayley_neumann(q, num_terms: int):
    """PEFT's ``_cayley_batch`` with ``use_cayley_neumann=True`` (its loop, term for term)."""
    b = q.shape[-1]
    r = jnp.broadcast_to(jnp.eye(b, dtype=q.dtype), q.shape)
    if num_terms > 1:
        r = r + 2.0 * q
        if num_terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, num_terms - 1):
                power = power @ q
                r = r + 2.0 * power
            power = power @ q
            r = r + power
    return r


def cayley_exact(q):
    """``R = (I - Q)(I + Q)^-1`` (PEFT: ``solve(I + Q, I - Q, left=False)``)."""
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    # X (I + Q) = I - Q  <=>  (I + Q)^T X^T = (I - Q)^T  <=>  (I - Q) X^T = I + Q
    return jnp.swapaxes(jnp.linalg.solve(eye - q, eye + q), -1, -2)


# ------------------------------------------------------------------------------------ config

_MIN_NEUMANN_VERSION = (0, 18)


def _version(v: Any) -> tuple[int, ...]:
    m = re.match(r"\s*(\d+)(?:\.(\d+))?", str(v).partition("@")[0])
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)


def _check_count(name: str, v: Any) -> int:
    if not is_int(v) or v < 0:
        raise fail(name, v, "must be a non-negative int.")
    return v


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig(AdapterConfig):
    """OFT, as HF PEFT's `OFTConfig` (0.21): a block-diagonal orthogonal rotation of each
    targeted module's input features (module docstring).

    Exactly one of `r` (number of blocks) and `oft_block_size` is non-zero (PEFT's defaults:
    ``r=0``, ``oft_block_size=32``). `use_cayley_neumann` is True by default (PEFT's docstring
    says False; its field default is True). `module_dropout` has no effect, as in PEFT 0.21.

    Attributes:
      (shared: common)
      r: the number of rotation blocks per module; ``0`` (default): set by ``oft_block_size``.
        Exactly one of the two is non-zero.
      oft_block_size: the size of each rotation block (``in_features / r``); ``0``: set by ``r``. A
        size that does not divide a module's input moves to PEFT's nearest divisor, with a
        ``UserWarning``.
      module_dropout: accepted, with no effect (as in PEFT 0.21, which never calls its dropout
        layer).
      fan_in_fan_out: (shared)
      init_weights: ``True``: zeros (``R = I``, a no-op); ``False``: ``N(0, 0.1^2)``, as PEFT.
      layers_to_transform: (shared)
      layers_pattern: (shared)
      coft: constrained OFT: each block is kept within a ball whose radius comes from ``eps`` (call
        `pj.constrain` after each optimizer step).
      eps: COFT's radius (positive with ``coft``).
      block_share: one block shared by every position of a module.
      use_cayley_neumann: the Neumann series instead of the exact Cayley transform (``True`` by
        default: PEFT's field default, although its docstring says ``False``).
      num_cayley_neumann_terms: the number of Neumann series terms.

    Example:

      >>> OFTConfig(oft_block_size=4, target_modules=["q_proj"]).use_cayley_neumann
      True
      >>> OFTConfig(r=2, target_modules=["q_proj"])  # r and the default oft_block_size=32
      Traceback (most recent call last):
      ...
      peftjax.errors.ConfigError: `oft_block_size`=32: give either `r` (2) or `oft_block_size`, ...
    """

    peft_type: ClassVar[str] = "OFT"
    method: ClassVar[str] = "oft"
    PEFT_UNSUPPORTED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {"bias": "none"}  # "all" / "oft_only": trains (and saves) the modules' biases
    )

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init_weights: bool = True
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("r", self.r)
        _check_count("oft_block_size", self.oft_block_size)
        if self.r == 0 and self.oft_block_size == 0:
            raise fail(
                "r",
                self.r,
                f"either `r` or `oft_block_size` must be non-zero (oft_block_size="
                f"{self.oft_block_size}).",
            )
        if self.r != 0 and self.oft_block_size != 0:
            raise fail(
                "oft_block_size",
                self.oft_block_size,
                f"give either `r` ({self.r}) or `oft_block_size`, not both: r x oft_block_size "
                "== in_features, so one decides the other (set the other to 0).",
            )
        check_dropout("module_dropout", self.module_dropout)
        for name in ("fan_in_fan_out", "coft", "block_share", "use_cayley_neumann"):
            check_bool(name, getattr(self, name))
        if not isinstance(self.init_weights, bool):
            raise fail("init_weights", self.init_weights, "OFT's init_weights is True or False.")
        if not is_real(self.eps):
            raise fail("eps", self.eps, "must be a finite number.")
        if self.coft and self.eps <= 0:
            raise fail("eps", self.eps, "COFT's radius must be positive.")
        _check_count("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        self._check_layers(str_targets_forbidden=False)

    @classmethod
    def from_dict(cls, d):
        """As `AdapterConfig.from_dict`, with PEFT's ``OFTConfig.check_kwargs``: a file without
        ``oft_block_size`` is from PEFT < 0.14 (another parametrisation) and is refused; a
        Neumann adapter from PEFT < 0.18 warns (PEFT changed the series in 0.18)."""
        if isinstance(d, Mapping) and cls is OFTConfig:
            if "oft_block_size" not in d:
                raise fail(
                    "oft_block_size",
                    None,
                    "missing: OFT changed in PEFT 0.14.0 and adapters without this field use "
                    "the old parametrisation, which peftjax (like PEFT >= 0.14) does not read.",
                )
            if d.get("use_cayley_neumann", False):
                if _version(d.get("peft_version", "0.0.0")) < _MIN_NEUMANN_VERSION:
                    warnings.warn(
                        "The cayley-neumann parameterization has been slightly changed to be "
                        "more numerically stable in PEFT 0.18.0. Please retrain your adapter "
                        "weights with newer PEFT versions. Alternatively, downgrade PEFT to "
                        "version 0.17.0 to use the old parameterization.",
                        UserWarning,
                        stacklevel=2,
                    )
        return super().from_dict(d)

    def resolve(self, path: str, d: int, warn: bool = True) -> tuple[int, int]:
        """``(n_blocks, block_size)`` of module ``path`` with ``d`` rotated features."""
        n, b, moved = resolve_blocks(d, self.r, self.oft_block_size)
        if moved and warn:
            old, new = (self.oft_block_size, b) if moved == "oft_block_size" else (self.r, n)
            warnings.warn(
                f"OFT on module `{path}`: invalid `{moved}` ({old}) for its {d} rotated "
                f"features; adjusted `{moved}` to ({new}), the nearest divisor (as PEFT: "
                f"block size {b}, {n} blocks).",
                UserWarning,
                stacklevel=4,
            )
        return n, b

    def module_spec(self, path, layout, shape, mask):
        n, b = self.resolve(path, _rotated_features(layout, shape))
        return OFTSpec(
            **spec_fields(layout, shape, mask, 1.0),
            n_blocks=n,
            block_size=b,
            config_r=self.r,
            config_block_size=self.oft_block_size,
            coft=self.coft,
            eps=float(self.eps),
            block_share=self.block_share,
            use_cayley_neumann=self.use_cayley_neumann,
            num_cayley_neumann_terms=self.num_cayley_neumann_terms,
            init_weights=self.init_weights,
            module_dropout=float(self.module_dropout),
        )

    def check_module(self, peft_path, spec):
        n, b = self.resolve(peft_path, _rotated_features(spec.layout, spec.shape), warn=False)
        if (n, b) != (spec.n_blocks, spec.block_size):
            raise ConfigError(
                f"`config` gives module `{peft_path}` {n} blocks of size {b} (r={self.r}, "
                f"oft_block_size={self.oft_block_size}), but its adapter has {spec.n_blocks} "
                f"of size {spec.block_size}."
            )
        for field in (
            "coft",
            "eps",
            "block_share",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
        ):
            mine = getattr(self, field)
            theirs = getattr(spec, field)
            if field == "eps" and not (self.coft or spec.coft):
                continue
            if field == "num_cayley_neumann_terms" and not spec.use_cayley_neumann:
                continue
            if mine != theirs:
                raise ConfigError(
                    f"`config.{field}`={mine!r} disagrees with the adapter on `{peft_path}` "
                    f"({theirs!r})."
                )

    @classmethod
    def from_specs(cls, entries, common):
        one = lambda field: one_value(entries, field, lambda s: getattr(s, field))  # noqa: E731
        return cls(
            **common,
            r=one_value(entries, "r", lambda s: s.config_r),
            oft_block_size=one_value(entries, "oft_block_size", lambda s: s.config_block_size),
            coft=one("coft"),
            eps=one("eps"),
            block_share=one("block_share"),
            use_cayley_neumann=one("use_cayley_neumann"),
            num_cayley_neumann_terms=one("num_cayley_neumann_terms"),
            init_weights=one("init_weights"),
            module_dropout=one("module_dropout"),
        )


# ------------------------------------------------------------------------------------ spec


@dataclasses.dataclass(frozen=True)
class OFTSpec(Spec):
    """One OFT adapter on one weight: ``n_blocks`` blocks of ``block_size`` (resolved for this
    module); ``config_r`` / ``config_block_size`` are the config's values as given (what PEFT's
    ``adapter_config.json`` keeps)."""

    n_blocks: int = 1
    block_size: int = 1
    config_r: int = 0
    config_block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init_weights: bool = True
    module_dropout: float = 0.0

    method: ClassVar[str] = "oft"
    #: the dense forward is ``(x R) K``: it needs the base matrix, not the base output
    needs_base_output: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.layout.kind == "conv":
            sp = self.layout.spatial(self.shape)
            if len(sp) != 2 or sp[0] != sp[1]:
                raise UnsupportedModuleError(
                    "oft adapts 2-D convs with square kernels (as PEFT: Conv2d, whose OFT uses "
                    f"kernel_size[0] twice); got a conv kernel of shape {self.shape}."
                )
        d = _rotated_features(self.layout, self.shape)
        if self.n_blocks * self.block_size != d:
            raise UnsupportedModuleError(
                f"OFT spec: {self.n_blocks} blocks of size {self.block_size} do not cover the "
                f"{d} rotated features of a weight of shape {self.shape}."
            )

    def describe(self) -> str:
        extra = ", shared" if self.block_share else ""
        extra += ", coft" if self.coft else ""
        return f"oft(b={self.block_size}, n={self.n_blocks}{extra})"

    @property
    def rows(self) -> int:
        """Rows of ``oft_R``: one per block, or one shared block."""
        return 1 if self.block_share else self.n_blocks

    def sharding_roles(self):
        """``oft_R (blocks, b(b-1)/2)``: block ``k`` rotates rotated features ``k*b..k*b+b-1``
        (the input axis; the output axis of an embedding), so the blocks split as those features
        do when the split falls on block boundaries, and are replicated otherwise (one shared
        block always)."""
        return {ARRAY: (OUT if self.layout.kind == "embed" else IN, None)}

    # ---- init -------------------------------------------------------------------------------
    def init_layer(self, key, w_layer, scale, dtype):
        shape = (self.rows, n_elements(self.block_size))
        if self.init_weights:
            v = jnp.zeros(shape, dtype)
        else:
            v = (jax.random.normal(key, shape, jnp.float32) * 0.1).astype(dtype)
            if self.coft:  # what PEFT's first forward leaves in the parameter
                v = coft_project(v.astype(jnp.float32), self.block_size, self.eps).astype(dtype)
        return {ARRAY: v}

    def constrain(self, arrays):
        """COFT's projection of the stored parameter (PEFT's in-place rewrite)."""
        if not self.coft or not arrays or arrays.get(ARRAY) is None:
            return arrays
        v = arrays[ARRAY]
        out = _coft_project_jit(jnp.asarray(v).astype(jnp.float32), self.block_size, self.eps)
        return {**arrays, ARRAY: out.astype(v.dtype)}

    # ---- math -------------------------------------------------------------------------------
    def blocks(self, arrays, scale):
        """The ``(n_blocks, b, b)`` float32 rotation blocks of one layer (the identity when the
        layer is off, ``scale == 0``)."""
        v = arrays[ARRAY].astype(jnp.float32)
        b = self.block_size
        if self.coft:
            v = coft_straight_through(v, b, self.eps)
        q = skew(v, b)
        if self.use_cayley_neumann:
            r = cayley_neumann(q, self.num_cayley_neumann_terms)
        else:
            r = cayley_exact(q)
        eye = jnp.eye(b, dtype=r.dtype)
        r = jnp.where(jnp.asarray(scale) != 0, r, eye)
        return jnp.broadcast_to(r, (self.n_blocks, b, b))

    def rotate(self, x, r):
        """``x R_bd`` on the last axis (``d`` features): each length-``b`` chunk times its block
        (PEFT's ``einsum('...rk,rkc->...rc')``)."""
        n, b = self.n_blocks, self.block_size
        xs = x.reshape(*x.shape[:-1], n, b)
        return jnp.einsum("...nk,nkc->...nc", xs, r).reshape(x.shape)

    def merge_layer(self, w32, arrays, scale):
        r = self.blocks(arrays, scale)
        m = self.to_matrix(w32)
        if self.layout.kind == "embed":  # E' = E R_bd
            out = self.rotate(m, r)
        else:  # K' = R_bd K
            n, b = self.n_blocks, self.block_size
            out = jnp.einsum("nij,njo->nio", r, m.reshape(n, b, -1)).reshape(m.shape)
        return self.from_matrix(out), arrays

    def unmerge_layer(self, w32, arrays, scale):
        inv = jnp.linalg.inv(self.blocks(arrays, scale))  # float32, as PEFT's linalg.inv
        m = self.to_matrix(w32)
        if self.layout.kind == "embed":  # E = E' R_bd^-1
            out = self.rotate(m, inv)
        else:  # K = R_bd^-1 K'
            n, b = self.n_blocks, self.block_size
            out = jnp.einsum("nij,njo->nio", inv, m.reshape(n, b, -1)).reshape(m.shape)
        return self.from_matrix(out), arrays

    def delta_matrix(self, arrays, scale):
        raise NotImplementedError("OFT is multiplicative: it has no additive delta")

    def _rotate_like_peft(self, x, arrays, scale):
        """PEFT's ``OFTRotationModule.forward``: ``x`` cast to the adapter's dtype, rotated, cast
        back."""
        dt = arrays[ARRAY].dtype
        r = self.blocks(arrays, scale).astype(dt)
        return self.rotate(x.astype(dt), r).astype(x.dtype)

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        """``(x R_bd) K``; ``module_dropout`` is never applied (PEFT 0.21 never calls it)."""
        xr = self._rotate_like_peft(x2, arrays, scale)
        dt = jnp.promote_types(xr.dtype, w2.dtype)
        y = (xr.astype(dt) @ w2.astype(dt)).astype(y2.dtype)
        return jnp.where(jnp.asarray(scale) != 0, y, y2)

    @property
    def gather_factored(self):
        return self.layout.kind == "embed"

    def gathered_forward(self, gather, y, arrays, scale):
        """Embedding: ``E[ids] R_bd``."""
        return self._rotate_like_peft(y, arrays, scale)

    # conv: no `conv_forward`; the forward runs the module's conv on the merged kernel
    # (`merge_layer`), the mathematically consistent OFT conv (module docstring)

    # ---- files ------------------------------------------------------------------------------
    def file_rules(self):
        suffix = "oft_embedding_R.weight" if self.layout.kind == "embed" else "oft_R.weight"
        return {ARRAY: (suffix, L.SAME)}
