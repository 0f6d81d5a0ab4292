"""``pj.apply``: run any JAX function with adapter-carrying params, computing adapters factored.

How it works (a small jaxpr interpreter on ``jax.make_jaxpr``, ``jax.extend.core`` and
``jax.lax``; it also reads the layout of jaxpr equations and the params of the primitives it
handles, which JAX's API policy does not cover: CONTRIBUTING.md lists exactly what, and why
pyproject's JAX floor is the version the suite runs on):

1. Every `Adapted` leaf in the arguments is replaced by its base array (copies for LN tuning /
   ``modules_to_save``, ``b * l`` for a bias under output-scaling IA3), and ``fn`` is traced to
   a jaxpr. Leaves with no active, unmerged adapter cost nothing: they are plain inputs.
2. The jaxpr is evaluated equation by equation. Values derived from an adapted weight by
   ``convert_element_type`` stay *tagged* with the weight's adapters. At a ``dot_general`` that
   contracts a tagged weight over its input axes, the base product is computed as usual and each
   adapter's factored rule is added on the matrix view: LoRA ``x @ A @ B * s``, LoKr through the
   Kronecker identity, DoRA and IA3 as PEFT's forward; LoHa builds its delta for that module only.
   A ``gather`` of rows of an embedding table (``jnp.take``, ``Embed``) gathers LoRA's ``A`` rows;
   a ``conv_general_dilated`` with an adapted kernel runs LoRA as PEFT does, ``conv(x, A) @ B``.
3. ``jit`` calls are inlined; ``scan`` (``nn.scan``, ``nnx.scan``, ``lax.scan``) is re-issued with
   ``jax.lax.scan`` whose body is interpreted, the stacked adapter arrays entering as extra
   ``xs`` (so no per-adapter copy of the stacked base is made; arrays stored for only some
   layers, ``layers_to_transform``, are first expanded to every layer with scale ``0`` on the
   others, `Spec.expand`); ``remat`` is re-issued with
   ``jax.checkpoint`` around the interpreted body.
4. Prompt learning (`peftjax.methods.prompt`): a ``gather`` of a word-embedding table carrying
   a ``"tokens"``-route adapter reads the virtual ids ``pj.prompt_inputs`` put in from the
   adapter's virtual rows (`_prompt_gather`); ``"attention"``-route adapters (adaption prompt)
   run ``fn`` inside their spec's flax method interceptor; ``"prefix"`` adapters need nothing
   here (their keys and values arrive as the model's KV cache input).
5. Any other use of a tagged value (transposed or sliced weight, ``custom_jvp``/``custom_vjp``,
   ``while``/``cond``, a returned weight...) gets the effective weight ``W + dW`` built at that
   point: slower but never silently wrong.

A dense weight that the function contracts only over the axes its layout calls *outputs* (an
``(out, in)`` kernel used as ``x @ W.T``, injected without ``Layout(transposed=True)``) has
adapters of the wrong orientation: `apply` raises `LayoutError` naming the module rather than
guess (a square kernel would otherwise run, and save, silently wrong).

Dropout (``lora_dropout``, LoHa/LoKr ``rank_dropout``/``module_dropout``) runs when ``rng`` is
given (training) and is off otherwise (inference), as PEFT's train/eval modes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as prims

from .errors import AdapterNameError, ArgumentTypeError, LayoutError, UnsupportedModuleError
from .methods import COPY, DELTA, DERIVED, PROMPT, Spec
from .node import is_adapted
from .quantize import Quantized, as_float, is_quantized

__all__ = ["apply"]


# ------------------------------------------------------------------------------------ bindings


@dataclasses.dataclass(frozen=True)
class _Binding:
    """The pending adapters of one weight value: ``[(spec, arrays, scale)]``.

    ``arrays`` and ``scale`` keep the stack axes not yet consumed by enclosing scans:
    ``stack_left`` of them.
    """

    node_id: int
    base_dtype: Any
    items: tuple  # ((spec, arrays, scale), ...)
    stack_left: int
    module: str = ""

    def slice_xs(self):
        """Pytree of arrays to pass as scan ``xs`` (sliced along axis 0)."""
        return [(arrays, scale) for _, arrays, scale in self.items]

    def with_slices(self, sliced) -> _Binding:
        items = tuple((spec, a, s) for (spec, _, _), (a, s) in zip(self.items, sliced))
        return dataclasses.replace(self, items=items, stack_left=self.stack_left - 1)


@dataclasses.dataclass(frozen=True)
class _Tag:
    binding: _Binding
    dtype: Any  # dtype of the tagged value (after converts)
    perm: tuple[int, ...] | None = None  # value axis i is the weight's axis perm[i] (transposes)

    def axes(self, ndim: int) -> tuple[int, ...]:
        return self.perm if self.perm is not None else tuple(range(ndim))


def _effective(binding: _Binding, w, dtype):
    """``W`` with every pending adapter merged (float32 math, cast once): the fallback.

    A binding's arrays are full-stack (`Spec.expand`), so the stack axes left are walked here
    with the layer rule and the binding's per-layer scales, not with `Spec.merge` (which takes
    an adapter's stored, possibly compact, arrays)."""
    w = as_float(w)
    w32 = w.astype(jnp.float32)
    for spec, arrays, scale in binding.items:
        if binding.stack_left == 0:
            w32 = spec.merge_layer(w32, arrays, scale)[0]
        else:  # the stack axes left (all of them, or those no enclosing scan sliced)
            n = int(np.prod(w.shape[: binding.stack_left]))
            lw = w32.reshape((n,) + spec.layer_shape)
            la = {k: v.reshape((n,) + v.shape[binding.stack_left :]) for k, v in arrays.items()}
            ls = jnp.reshape(scale, (n,))
            w32 = jax.vmap(lambda a, b, c, spec=spec: spec.merge_layer(a, b, c)[0])(
                lw, la, ls
            ).reshape(w.shape)
    return w32.astype(dtype)


# ------------------------------------------------------------------------------ quantized weights
# A `Quantized` base (`pj.quantize`) stays packed in the interpreter's environment: a convert
# only changes the dtype it will decode to, and each use decodes it inside a `jax.checkpoint`
# together with the operation that reads it (`_bind_q`), so that under `jax.grad` the residual is
# the packed weight and the float copy is rebuilt in the backward, never held across the step.


def _as_dtype(q: Quantized, dtype) -> Quantized:
    return Quantized(q.arrays, q.shape, dtype, q.scheme, q.block_size, q.double_quant)


def _bind_q(eqn, invals):
    """`_bind` where some inputs may be `Quantized`: decoded and used in one checkpoint."""
    qpos = [i for i, v in enumerate(invals) if is_quantized(v)]
    if not qpos:
        return _bind(eqn, invals)
    others = [None if is_quantized(v) else v for v in invals]

    def use(qs, others):
        full = list(others)
        for i, q in zip(qpos, qs, strict=True):
            full[i] = q.dense()
        return _bind(eqn, full)

    return jax.checkpoint(use)([invals[i] for i in qpos], others)


#: primitives that take a `Quantized` value as it is: the handlers walk into them
_Q_AWARE = frozenset(
    {
        prims.convert_element_type_p,
        prims.jit_p,
        prims.closed_call_p,
        prims.remat_p,
        prims.scan_p,
    }
)


# ------------------------------------------------------------------------------------ interpreter


class _Interp:
    def __init__(self, rng, uses: dict | None = None, in_loop: bool = False):
        self.rng = rng
        self.site = 0
        # inside a scan body: dots stay factored (`_dot`), never fused
        self.in_loop = in_loop
        # node_id -> {"in", "out"}: which axes of a dense weight the function contracts
        self.uses: dict = {} if uses is None else uses
        # (id(x), axes order, in features) -> (x, x flattened to 2-D): the adapters of modules
        # that read one input (q/k/v, gate/up) share one flattened copy, so a scan saves one
        # residual for their factor gradients, not one per module (x is kept: ids stay unique)
        self.flat: dict = {}

    def flatten(self, x, order: tuple[int, ...], n_in: int):
        key = (id(x), order, n_in)
        hit = self.flat.get(key)
        if hit is None or hit[0] is not x:
            hit = self.flat[key] = (x, jnp.transpose(x, order).reshape(-1, n_in))
        return hit[1]

    def next_rng(self):
        if self.rng is None:
            return None
        self.site += 1
        return jax.random.fold_in(self.rng, self.site)

    # values: env maps Var -> value; tags maps Var -> _Tag (value is then the *base-derived* value)
    def run(self, jaxpr, consts, args, arg_tags):
        env: dict = {}
        tags: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val
            return env[v]

        def write(v, val, tag=None):
            if isinstance(v, jcore.DropVar):
                return
            env[v] = val
            if tag is not None:
                tags[v] = tag

        for v, c in zip(jaxpr.constvars, consts):
            write(v, c)
        for v, a, t in zip(jaxpr.invars, args, arg_tags):
            write(v, a, t)

        cache: dict = {}

        def materialize(v):
            """Effective value of a tagged var (W + dW, with the var's converts applied)."""
            if isinstance(v, jcore.Literal) or v not in tags:
                return as_float(read(v))
            if v not in cache:
                t = tags[v]
                val = env[v]
                if t.perm is None:
                    cache[v] = _effective(t.binding, val, t.dtype)
                else:  # build W + dW in the weight's orientation, then view it as the value
                    inv = tuple(int(i) for i in np.argsort(t.perm))
                    eff = _effective(t.binding, jnp.transpose(as_float(val), inv), t.dtype)
                    cache[v] = jnp.transpose(eff, t.perm)
            return cache[v]

        for eqn in jaxpr.eqns:
            tagged = [not isinstance(v, jcore.Literal) and v in tags for v in eqn.invars]
            if not any(tagged):
                invals = [read(v) for v in eqn.invars]
                if eqn.primitive in _Q_AWARE and any(map(is_quantized, invals)):
                    res = _HANDLERS[eqn.primitive](self, eqn, read, tags, materialize)
                    for v, (o, t) in zip(eqn.outvars, res):
                        write(v, o, t)
                    continue
                outs = _bind_q(eqn, invals)
                for v, o in zip(eqn.outvars, outs):
                    write(v, o)
                continue
            handler = _HANDLERS.get(eqn.primitive)
            res = handler(self, eqn, read, tags, materialize) if handler else None
            if res is None:  # fallback: effective weights for every tagged operand
                outs = _bind(eqn, [materialize(v) for v in eqn.invars])
                res = [(o, None) for o in outs]
            for v, (o, t) in zip(eqn.outvars, res):
                write(v, o, t)
        return [materialize(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
    """Evaluate one equation as ``jax.core.eval_jaxpr`` does (call primitives too)."""
    bp = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bp if isinstance(bp, tuple) else ((), bp)  # older JAX: (subfuns, params)
    ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
    if ctx is not None:
        with ctx:
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        outs = eqn.primitive.bind(*subfuns, *invals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _convert(interp, eqn, read, tags, materialize):
    (v,) = eqn.invars
    x = read(v)
    if is_quantized(x):  # decoded later, to this dtype
        out = _as_dtype(x, eqn.params["new_dtype"])
    else:
        out = eqn.primitive.bind(x, **eqn.params)
    tag = tags.get(v)
    return [(out, None if tag is None else dataclasses.replace(tag, dtype=out.dtype))]


def _transpose(interp, eqn, read, tags, materialize):
    """A transposed view of an adapted weight stays tagged (``x @ W.T`` as GPT-2's Conv1D)."""
    (v,) = eqn.invars
    val = as_float(read(v))
    t: _Tag = tags[v]
    axes = t.axes(val.ndim)
    out = eqn.primitive.bind(val, **eqn.params)
    perm = tuple(axes[i] for i in eqn.params["permutation"])
    return [(out, dataclasses.replace(t, perm=perm))]


def _dot(interp: _Interp, eqn, read, tags, materialize):
    lhs_v, rhs_v = eqn.invars
    ((lc, rc), (lb, rb)) = eqn.params["dimension_numbers"]
    lt = not isinstance(lhs_v, jcore.Literal) and lhs_v in tags
    rt = not isinstance(rhs_v, jcore.Literal) and rhs_v in tags
    if lt and rt or lb or rb:
        return None
    w_v, x_v, wc, xc = (rhs_v, lhs_v, rc, lc) if rt else (lhs_v, rhs_v, lc, rc)
    tag: _Tag = tags[w_v]
    b = tag.binding
    if b.stack_left:
        return None
    spec0: Spec = b.items[0][0]
    lay = spec0.layout
    if lay.kind == "conv":
        return None
    n_in = lay.n_in if lay.kind == "dense" else 1
    val = read(w_v)  # the weight as the dot sees it (maybe transposed)
    ndim = val.ndim
    if ndim != len(spec0.layer_shape):
        return None
    axes = tag.axes(ndim)  # value axis -> weight axis
    inv = tuple(int(i) for i in np.argsort(axes))
    w = val if tag.perm is None else jnp.transpose(val, inv)  # weight orientation
    in_axes = tuple(range(ndim - n_in, ndim)) if lay.transposed else tuple(range(n_in))
    wc_w = [axes[d] for d in wc]  # contracted weight axes, in dot order
    if lay.kind == "dense":
        out_axes = tuple(d for d in range(ndim) if d not in in_axes)
        if tuple(sorted(wc_w)) == in_axes:
            interp.uses.setdefault(b.node_id, set()).add("in")
        elif tuple(sorted(wc_w)) == out_axes:
            interp.uses.setdefault(b.node_id, set()).add(("out", b.module, tuple(w.shape), lay))
    if tuple(sorted(wc_w)) != in_axes:
        return None
    free_w = [axes[d] for d in range(ndim) if d not in wc]  # output axes in the dot's order
    if free_w != sorted(free_w):
        return None
    out_axes_shape = tuple(w.shape[d] for d in free_w)
    for i, (spec, _, _) in enumerate(b.items):
        # a mixed batch's groups never overlap on an example (one adapter each): a DoRA group
        # sees the base output for its own examples wherever it stands in the chain
        chained = spec.needs_base_output and i > 0 and not isinstance(spec, _Group)
        if not spec.factored or chained:
            return None
    # x contracted dims in the order of W's input axes; free dims keep their order
    order = np.argsort(wc_w)
    x_c = [xc[j] for j in order]
    x_ndim = (eqn.invars[0] if rt else eqn.invars[1]).aval.ndim
    x_free = [d for d in range(x_ndim) if d not in xc]
    n_in_flat, n_out_flat = spec0.in_out
    n_out_axes = ndim - n_in
    rngs = [interp.next_rng() for _ in b.items]
    specs = [spec for spec, _, _ in b.items]

    def factored(lhs, rhs, arrs, rngs=rngs):
        """The base product plus each adapter's factored rule on 2-D ``(tokens, features)``.

        Every leading (token) axis is flattened into one: on 3-D activations XLA:CPU lowers the
        factor gradients (``x^T @ g`` contracting batch *and* sequence) through full-size
        transposed copies of the activations, which made a LoRA step on MLP / all-linear targets
        2-3x its floor (benchmarks/RESULTS.md, benchmarks/xla_skinny_dots.py); 2-D dots have none.
        """
        x, wv = (lhs, rhs) if rt else (rhs, lhs)
        out = _bind_q(eqn, [lhs, rhs])[0]
        free_shape = [x.shape[d] for d in x_free]
        x2 = interp.flatten(x, tuple(x_free + x_c), n_in_flat)
        if rt:  # out = (*x_free, *w_out)
            y2 = out.reshape(-1, n_out_flat)
        else:  # out = (*w_out, *x_free)
            nf = len(free_shape)
            perm = list(range(n_out_axes, n_out_axes + nf)) + list(range(n_out_axes))
            y2 = jnp.transpose(out, perm).reshape(-1, n_out_flat)
        w2 = None
        for spec, (arrays, scale), rng in zip(specs, arrs, rngs):
            if spec.needs_base_output and w2 is None:
                wd = as_float(wv)
                w2 = lay.to_matrix(wd if tag.perm is None else jnp.transpose(wd, inv))
            y2 = spec.linear_forward(x2, y2, arrays, w2, scale, rng)
        if rt:
            y = y2.reshape(out.shape)
        else:
            nf = len(free_shape)
            t = y2.reshape(*free_shape, *out_axes_shape)
            perm = list(range(nf, nf + n_out_axes)) + list(range(nf))
            y = jnp.transpose(t, perm)
        return y.astype(out.dtype)

    arrs = [(arrays, jnp.asarray(scale, jnp.float32)) for _, arrays, scale in b.items]
    lhs, rhs = read(lhs_v), read(rhs_v)
    tokens = int(np.prod([(rhs if lt else lhs).shape[d] for d in x_free]))
    # In a scan body the fused form is not used: its custom JVP gives every module its own
    # residuals, which the scan then stacks (q, k and v would each keep a copy of their one
    # input for the backward); factored, the modules reading one input share one copy.
    if (
        interp.in_loop
        or is_quantized(val)
        or not _fuse_when_not_differentiated(specs, rngs, lay, tokens, n_in_flat, n_out_flat)
    ):
        return [(factored(lhs, rhs, arrs), None)]

    def merged(lhs, rhs, arrs):
        """``x @ (W + dW)``: the delta built once, the base product made with it."""
        wv = lhs if lt else rhs
        w = wv if tag.perm is None else jnp.transpose(wv, inv)
        w32 = w.astype(jnp.float32)
        for spec, (arrays, scale) in zip(specs, arrs):
            w32 = w32 + spec.delta_layer(arrays, scale)
        weff = w32.astype(wv.dtype)
        weff = weff if tag.perm is None else jnp.transpose(weff, axes)
        a, c = (weff, rhs) if lt else (lhs, weff)
        return eqn.primitive.bind(a, c, **eqn.params)

    fused = jax.custom_jvp(merged)
    no_rng = [None] * len(specs)  # dropout is off on this path; keep traced keys out of the rule
    fused.defjvp(
        lambda primals, tangents: jax.jvp(
            lambda l, r, a: factored(l, r, a, no_rng), primals, tangents
        )
    )
    return [(fused(lhs, rhs, arrs), None)]


def _fuse_when_not_differentiated(specs, rngs, lay, tokens: int, n_in: int, n_out: int) -> bool:
    """Whether a dot's adapters may be applied merged on the fly (``x @ (W + dW)``) when nobody
    differentiates it: every adapter `Spec.fusable` (plain LoRA without active dropout) on a
    dense weight, and more tokens
    than the crossover ``in * out / (in + out)``, beyond which building ``dW`` (``2 in out r``
    FLOPs, once) is cheaper than the factored ``x @ A @ B`` (``2 T r (in + out)``). Under
    ``jax.grad`` / ``jvp`` the custom JVP rule computes the factored form instead, so training
    never builds ``W + dW`` nor its full-size gradient."""
    if lay.kind != "dense":
        return False
    if not all(spec.fusable(rng is not None) for spec, rng in zip(specs, rngs)):
        return False
    return tokens * (n_in + n_out) > n_in * n_out


def _conv(interp: _Interp, eqn, read, tags, materialize):
    """A conv with an adapted kernel: each adapter's `Spec.conv_forward` (LoRA as PEFT:
    ``conv(dropout(x), A)`` then ``@ B``), given the module's own conv to run on other kernels."""
    lhs_v, rhs_v = eqn.invars
    if isinstance(rhs_v, jcore.Literal) or rhs_v not in tags or lhs_v in tags:
        return None
    tag: _Tag = tags[rhs_v]
    b = tag.binding
    p = eqn.params
    if b.stack_left or tag.perm is not None:
        return None
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return None
    w = as_float(read(rhs_v))
    nd = w.ndim
    # the kernel must be read as the Flax layout (*spatial, in, out) the adapter was built for
    if tuple(p["dimension_numbers"].rhs_spec) != (nd - 1, nd - 2, *range(nd - 2)):
        return None
    for spec, _, _ in b.items:
        if not spec.conv_factored or spec.layout.layer_shape(spec.shape) != tuple(w.shape):
            return None
    x = read(lhs_v)
    out = eqn.primitive.bind(x, w, **p)
    fdim = p["dimension_numbers"].out_spec[1]
    conv = lambda xv, kernel: eqn.primitive.bind(  # noqa: E731
        xv, kernel, **dict(p, preferred_element_type=None)
    )
    y = out
    for spec, arrays, scale in b.items:
        y = spec.conv_forward(conv, x, y, arrays, scale, interp.next_rng(), fdim)
    return [(y.astype(out.dtype), None)]


def _gather(interp: _Interp, eqn, read, tags, materialize):
    w_v, idx_v = eqn.invars
    if isinstance(idx_v, jcore.Literal) is False and idx_v in tags:
        return None
    tag: _Tag = tags[w_v]
    b = tag.binding
    prompt = any(spec.role == PROMPT for spec, _, _ in b.items)  # a word embedding's virtual ids
    if b.stack_left or tag.perm is not None:
        if prompt:
            _prompt_lookup_error(b)
        return None
    dn = eqn.params["dimension_numbers"]
    w = as_float(read(w_v))
    if (
        w.ndim != 2
        or tuple(dn.collapsed_slice_dims) != (0,)
        or tuple(dn.start_index_map) != (0,)
        or tuple(eqn.params["slice_sizes"]) != (1, w.shape[1])
        or tuple(dn.operand_batching_dims)
        or tuple(dn.offset_dims) != (eqn.outvars[0].aval.ndim - 1,)  # features last only
    ):
        if prompt:
            _prompt_lookup_error(b)
        return None
    if prompt:
        return _prompt_gather(interp, eqn, b, w, read(idx_v))
    for spec, _, _ in b.items:
        if not spec.gather_factored:
            return None
    idx = read(idx_v)
    out = eqn.primitive.bind(w, idx, **eqn.params)

    def gather(table):
        """The same rows of another ``(vocab, n)`` table."""
        params = dict(eqn.params, slice_sizes=(1, table.shape[1]))
        return eqn.primitive.bind(table, idx, **params)

    y = out
    for spec, arrays, scale in b.items:
        y = spec.gathered_forward(gather, y, arrays, jnp.asarray(scale, jnp.float32))
    return [(y.astype(out.dtype), None)]


def _prompt_lookup_error(b: _Binding):
    raise UnsupportedModuleError(
        f"module `{b.module}`: a prompt-learning adapter sits on this word embedding, but the "
        "function reads the table other than as a row lookup of a 2-D table (`jnp.take(table, "
        "ids, axis=0)`, `nn.Embed`, `table[ids]`), so the virtual tokens cannot be put in."
    )


def _prompt_gather(interp: _Interp, eqn, b: _Binding, w, idx):
    """The lookup of `pj.prompt_inputs`' ids in ``[E; virtual rows]`` (the ``"tokens"`` route of
    `peftjax.methods.prompt`): ids ``V + g*T + k`` pick row ``k`` of prompt group ``g``; the
    others are the table's rows, as the model's own gather gives them."""
    (spec, arrays, _), *rest = b.items
    if rest:
        raise UnsupportedModuleError(
            f"module `{b.module}`: a prompt-learning adapter ({spec.method}) and other adapters "
            f"({[s.method for s, _, _ in rest]}) are active on one word embedding; activate one."
        )
    rows = spec.virtual_rows(arrays, interp.next_rng()).reshape(-1, w.shape[1]).astype(w.dtype)
    # two row gathers and a select (never a copy of the whole table): ids below V read the
    # table, the others row ``id - V`` of the virtual rows; both index sets are clipped in range
    vocab = w.shape[0]
    real = eqn.primitive.bind(w, jnp.clip(idx, 0, vocab - 1), **eqn.params)
    virt = eqn.primitive.bind(rows, jnp.clip(idx - vocab, 0, rows.shape[0] - 1), **eqn.params)
    return [(jnp.where((idx >= vocab)[..., :1], virt, real), None)]


def _inline(interp: _Interp, eqn, read, tags, materialize):
    closed = eqn.params["jaxpr"]
    args = [read(v) for v in eqn.invars]
    arg_tags = [tags.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]
    outs = interp.run(closed.jaxpr, closed.consts, args, arg_tags)
    return [(o, None) for o in outs]


def _remat(interp: _Interp, eqn, read, tags, materialize):
    jaxpr = eqn.params["jaxpr"]
    args = [read(v) for v in eqn.invars]
    arg_tags = [tags.get(v) if not isinstance(v, jcore.Literal) else None for v in eqn.invars]

    def body(*a):
        return interp.run(jaxpr, (), list(a), arg_tags)

    fn = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
    return [(o, None) for o in fn(*args)]


def _scan(interp: _Interp, eqn, read, tags, materialize):
    p = eqn.params
    closed = p["jaxpr"]
    nc, ncarry = p["num_consts"], p["num_carry"]
    invars = list(eqn.invars)
    consts_v, carry_v, xs_v = invars[:nc], invars[nc : nc + ncarry], invars[nc + ncarry :]
    # carries cannot be tagged (their value changes); materialize them
    init = [materialize(v) for v in carry_v]
    consts = [read(v) for v in consts_v]
    const_tags = [tags.get(v) if not isinstance(v, jcore.Literal) else None for v in consts_v]
    xs, xs_tags, extra = [], [], []
    for v in xs_v:
        t = tags.get(v) if not isinstance(v, jcore.Literal) else None
        if t is not None and t.binding.stack_left >= 1 and t.perm is None:
            # a quantized stack is decoded whole here (its blocks do not follow the layers)
            xs.append(as_float(read(v)))
            xs_tags.append(t)
            extra.append(t.binding.slice_xs())
        else:
            xs.append(materialize(v))
            xs_tags.append(None)
            extra.append(None)
    with_rng = interp.rng is not None
    outer_rng = interp.rng

    def body(carry, inp):
        xs_i, extra_i, step = inp
        inner_tags = list(const_tags) + [None] * ncarry
        for t, e in zip(xs_tags, extra_i):
            inner_tags.append(None if t is None else _Tag(t.binding.with_slices(e), t.dtype))
        rng = jax.random.fold_in(outer_rng, step) if with_rng else None
        sub = _Interp(rng, interp.uses, in_loop=True)
        outs = sub.run(closed.jaxpr, closed.consts, consts + list(carry) + list(xs_i), inner_tags)
        return outs[:ncarry], outs[ncarry:]

    steps = jnp.arange(p["length"], dtype=jnp.uint32)
    if with_rng:
        interp.site += 1
        outer_rng = jax.random.fold_in(interp.rng, interp.site)
    carry, ys = jax.lax.scan(
        body, init, (xs, extra, steps), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [(o, None) for o in list(carry) + list(ys)]


#: The equations the interpreter handles itself, keyed by primitive object. A handler is
#: ``handler(interp, eqn, read, tags, materialize) -> [(value, tag or None)] | None`` for an
#: equation with at least one tagged (adapter-carrying) input: ``read(var)`` gives a var's
#: value (for a tagged var, the *base*-derived value), ``tags`` maps vars to their `_Tag`,
#: ``materialize(var)`` gives a var's effective value ``W + dW``. It returns one
#: ``(value, tag)`` per output var, or ``None`` to decline: the interpreter then evaluates the
#: equation on the effective values of every tagged input (slower, never wrong).
_HANDLERS = {
    prims.convert_element_type_p: _convert,
    prims.transpose_p: _transpose,
    prims.dot_general_p: _dot,
    prims.conv_general_dilated_p: _conv,
    prims.gather_p: _gather,
    prims.jit_p: _inline,
    prims.closed_call_p: _inline,
    prims.remat_p: _remat,
    prims.scan_p: _scan,
}


# ------------------------------------------------------------------------------------ entry


_ARRAY = object()  # marks an array output leaf among the kept non-array ones


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, Quantized)) or hasattr(x, "aval")


def _traceable(dyn):
    """``dyn`` with each `Quantized` weight as its float shape, for ``jax.make_jaxpr``."""
    return [jax.ShapeDtypeStruct(v.shape, v.dtype) if is_quantized(v) else v for v in dyn]


def _prepare(args_tree):
    """Replace adapted leaves: returns (flat values, flat bindings (or None), treedef, the
    ``"attention"``-route prompt adapters ``[(module, spec, arrays)]``)."""
    from ._tree import group_modules, walk
    from .transforms import owner_of, with_shared

    leaves, treedef = walk(args_tree)
    groups = None
    vals, binds, attention = [], [], []
    for i, l in enumerate(leaves):
        node = l.value
        if not is_adapted(node):
            vals.append(node)
            binds.append(None)
            continue
        pend = node.pending()
        value = node.base
        if is_quantized(value) and any(s.role in (COPY, DERIVED) for _, s, _ in pend):
            value = value.dense()  # a copy / a derived bias reads the float weight
        items = []
        for name, spec, arrays in pend:
            if spec.role == PROMPT:
                if spec.route == "tokens":  # the word embedding's lookup (`_prompt_gather`)
                    items.append((spec, arrays, jnp.float32(1.0)))
                elif spec.route == "attention":
                    attention.append((_arg_module(l.module), spec, arrays))
                continue  # "prefix": `pj.prompt_inputs` builds the model's cache
            if spec.role == COPY:
                if items:  # adapters activated before the copy are replaced by it (as `merge`)
                    value, items = _effective(_binding(i, value, items), value, value.dtype), []
                value = spec.value(value, arrays)
            elif spec.role == DERIVED:
                if groups is None:
                    groups = group_modules(leaves)
                owner = owner_of(groups[l.module], spec, name)
                value = spec.derived_value(value, *owner).astype(value.dtype)
            else:
                # full-stack arrays (compact ones expanded): the scan ``xs`` need every layer
                if groups is None and spec.shared_holder() is not None:
                    groups = group_modules(leaves)
                full = with_shared(groups or {}, spec, name, arrays, l.module)
                items.append((spec, spec.expand(full), _scale_of(spec)))
        if items and any(s.role == COPY for _, s, _ in pend):
            # a copy plus other adapters on one leaf: just build the effective weight
            value, items = _effective(_binding(i, value, items), value, value.dtype), []
        vals.append(value)
        binds.append(_binding(i, value, items, _arg_module(l.module)) if items else None)
    return vals, binds, treedef, attention


# ------------------------------------------------------------------------- mixed-adapter batches


class _Group:
    """The adapters of one module batched together (`apply`'s ``adapter_ids``): stands in a
    binding's items for a `Spec`, with ``arrays = {"stack": each array stacked over the group's
    adapters (plus one neutral slot, last), "slot": each example's slot}`` and the scales
    stacked likewise. Only the factored forwards exist: a mixed batch has no single effective
    weight."""

    role = DELTA
    factored = True

    def __init__(self, spec: Spec, names: tuple[str, ...], module: str):
        self.spec, self.names, self.module = spec, names, module
        self.layout, self.layer_shape, self.in_out = spec.layout, spec.layer_shape, spec.in_out
        self.method = spec.method
        self.needs_base_output = spec.needs_base_output

    def fusable(self, training):
        return False

    conv_factored = False

    @property
    def gather_factored(self):
        return self.spec.gather_factored

    def _split(self, arrays):
        return arrays["stack"], arrays["slot"]

    def linear_forward(self, x2, y2, arrays, w2, scale, rng):
        stack, slot = self._split(arrays)
        n = slot.shape[0]
        if x2.shape[0] % n:
            raise UnsupportedModuleError(
                f"module `{self.module}`: a mixed-adapter batch of {n} examples, but the weight "
                f"is applied to {x2.shape[0]} rows, not a multiple of {n}: `adapter_ids` need "
                "the batch axis to lead the module's input."
            )
        x3 = x2.reshape(n, -1, x2.shape[-1])
        y3 = y2.reshape(n, -1, y2.shape[-1])
        y = self.spec.mixed_forward(x3, y3, stack, slot, w2, scale, rng)
        if self.spec.mixed_neutral_exact:
            return y.reshape(y2.shape)
        # examples of other groups (or the base) keep the output so far exactly: some rules
        # (IA3 on inputs) recompute the output from the base rather than add to it
        neutral = next(iter(stack.values())).shape[0] - 1
        return jnp.where((slot == neutral)[:, None, None], y3, y).reshape(y2.shape)

    def gathered_forward(self, gather, y, arrays, scale):
        stack, slot = self._split(arrays)
        if y.ndim < 2 or y.shape[0] != slot.shape[0]:
            raise UnsupportedModuleError(
                f"module `{self.module}`: a mixed-adapter batch of {slot.shape[0]} examples, but "
                f"the embedding lookup gives rows of shape {list(y.shape)}: `adapter_ids` need "
                "the batch axis to lead the ids."
            )
        return self.spec.mixed_gathered_forward(gather, y, stack, slot, scale)

    def merge_layer(self, w32, arrays, scale):
        raise UnsupportedModuleError(
            f"module `{self.module}`: in a mixed-adapter batch (`adapter_ids`) its weight is used "
            "other than as a matmul or an embedding lookup (a transposed or sliced weight, a "
            "convolution, a custom_vjp...), where each example would need its own effective "
            f"weight; run adapters {list(self.names)} one at a time (`pj.set_active`) instead."
        )

    unmerge_layer = merge_layer


def _mixed_ids(ids, names: tuple[str, ...]):
    """``adapter_ids`` as an int32 array of indices into ``names`` (``-1``: the base model).
    Names (or ``None``) are checked here; an int array may be traced (any mix, one compile)."""
    if isinstance(ids, (list, tuple)) and all(i is None or isinstance(i, str) for i in ids):
        unknown = sorted({i for i in ids if i is not None and i not in names})
        if unknown:
            raise AdapterNameError(
                f"adapter_ids: unknown adapter(s) {unknown}; the params carry {list(names)} "
                "(use None for the base model)."
            )
        if not ids:
            raise ValueError("adapter_ids: empty; give one adapter name (or None) per example.")
        return jnp.asarray([-1 if i is None else names.index(i) for i in ids], jnp.int32)
    if isinstance(ids, str):
        raise ArgumentTypeError(
            f"adapter_ids={ids!r}: give one name per example (a list), not a single string; "
            "for one adapter on the whole batch use `pj.set_active`."
        )
    arr = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    if arr.ndim != 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ArgumentTypeError(
            "adapter_ids: expected a list of adapter names (None for the base) or a 1-D integer "
            f"array of indices into pj.adapter_names(params) (-1 for the base), got {arr.dtype} "
            f"of shape {list(arr.shape)}."
        )
    if not isinstance(arr, jax.core.Tracer):
        bad = np.asarray(arr)
        bad = bad[(bad < -1) | (bad >= len(names))]
        if bad.size:
            raise AdapterNameError(
                f"adapter_ids: index {int(bad[0])} is out of range: the params carry "
                f"{len(names)} adapter(s) {list(names)} (-1 is the base model)."
            )
    return jnp.asarray(arr, jnp.int32)


def _prepare_mixed(args_tree, adapter_ids):
    """`_prepare` for a mixed batch: every loaded (unmerged) adapter of a module enters its
    binding, grouped by `Spec.mixed_key`, with each example's slot looked up from its id."""
    from ._tree import group_modules, walk
    from .transforms import adapter_names, with_shared

    names = adapter_names(args_tree)
    modules = None
    if not names:
        raise AdapterNameError("adapter_ids: the arguments carry no adapter.")
    leaves, treedef = walk(args_tree)
    for l in leaves:
        node = l.value
        if is_adapted(node) and node.merged:
            raise UnsupportedModuleError(
                f"module `{_arg_module(l.module)}`: adapters {list(node.merged)} are merged into "
                "the weight; a mixed-adapter batch needs them unmerged (`pj.unmerge`), as PEFT's "
                "`adapter_names=` does."
            )
        if is_adapted(node):
            for name, spec in node.specs:
                if spec.role != DELTA or not spec.factored:
                    raise UnsupportedModuleError(
                        f"module `{_arg_module(l.module)}`: adapter `{name}` ({spec.method}) "
                        "cannot be batched with others by `adapter_ids` ("
                        + (
                            "a prompt-learning method changes the inputs, not the weights"
                            if spec.role == PROMPT
                            else "it scales the layer's bias with its output, which a mixed "
                            "batch cannot do per example"
                            if spec.role == DERIVED
                            else "it replaces the weight rather than adding a factored term"
                            if spec.role == COPY
                            else "it has no factored forward on this weight"
                        )
                        + "); batch LoRA, DoRA, IA3, LoKr, LoHa, VeRA... adapters, or run it "
                        "alone with `pj.set_active`."
                    )
    ids = _mixed_ids(adapter_ids, names)
    index = {n: i for i, n in enumerate(names)}
    vals, binds = [], []
    for i, l in enumerate(leaves):
        node = l.value
        if not is_adapted(node) or node.disabled or not node.specs:
            vals.append(node.base if is_adapted(node) else node)
            binds.append(None)
            continue
        module = _arg_module(l.module)
        groups: dict = {}
        for name, spec in node.specs:
            groups.setdefault(spec.mixed_key(), []).append((name, spec))
        items = []
        for members in groups.values():
            specs = tuple(s for _, s in members)
            arrs = []
            for name, spec in members:
                arrays = node.arrays[name]
                if spec.shared_holder() is not None:  # VeRA: the shared projections
                    if modules is None:
                        modules = group_modules(leaves)
                    arrays = with_shared(modules, spec, name, arrays, l.module)
                full = spec.expand(arrays)
                arrs.append(spec.mixed_pad(full, specs))
            ax = specs[0].layout.stack  # the stack axes lead; the group's slots come next
            shapes = {tuple((k, v.shape) for k, v in sorted(a.items())) for a in arrs}
            if len(shapes) != 1:
                raise UnsupportedModuleError(
                    f"module `{module}`: adapters {[n for n, _ in members]} "
                    f"({specs[0].method}) have arrays of different shapes {sorted(shapes)}, "
                    "which a mixed-adapter batch cannot stack."
                )
            arrs.append(specs[0].mixed_neutral(arrs[0]))
            stack = {k: jnp.stack([a[k] for a in arrs], axis=ax) for k in arrs[0]}
            scales = [_scale_of(s) for s in specs]
            scales.append(jnp.zeros_like(scales[0]))
            scale = jnp.stack(scales, axis=-1)
            lut = np.full(len(names) + 1, len(members), np.int32)  # position 0: id -1 (base)
            for j, (name, _) in enumerate(members):
                lut[index[name] + 1] = j
            slot = jnp.take(jnp.asarray(lut), ids + 1, mode="fill", fill_value=len(members))
            slot = jnp.broadcast_to(slot, scale.shape[:-1] + slot.shape)
            # the forward reads the (padded) arrays, not the specs' own shapes: any member serves
            group = _Group(specs[0], tuple(n for n, _ in members), module)
            items.append((group, {"stack": stack, "slot": slot}, scale))
        vals.append(node.base)
        binds.append(_binding(i, node.base, items, module))
    return vals, binds, treedef, []


def _arg_module(module: str) -> str:
    """The module path inside its argument (``walk((args, kwargs))`` prefixes ``0.<i>.``)."""
    parts = module.split(".", 2)
    mod = parts[2] if len(parts) == 3 else module
    return mod[len("params.") :] if mod.startswith("params.") else mod


def _binding(i: int, value, items, module: str = "") -> _Binding:
    return _Binding(i, value.dtype, tuple(items), items[0][0].layout.stack, module)


def _check_orientation(uses: dict) -> None:
    """Refuse dense weights used only with their layout's *output* axes contracted."""
    for marks in uses.values():
        if "in" in marks:
            continue  # also used as its layout says: a second, transposed use (tied weights)
        for m in marks:
            _, module, shape, lay = m
            flip = dataclasses.replace(lay, transposed=not lay.transposed)
            key = module.split(".")[-1] or module
            raise LayoutError(
                f"module `{module}`: the function contracts its weight of shape {list(shape)} "
                f"only over the axes that `inject` read as outputs ({lay}), so the weight is "
                "stored "
                + ("(in, out)" if lay.transposed else "(out, in)")
                + " (e.g. transformers' Flax GPT-2 `Conv1D`, used as `x @ W.T`) and the adapter "
                "was built for the other orientation. Inject with "
                f"`layouts={{'{key}': pj.Layout('dense'"
                + (", transposed=True" if flip.transposed else "")
                + (f", stack={lay.stack}" if lay.stack else "")
                + (f", n_in={lay.n_in}" if lay.n_in != 1 else "")
                + ")}`."
            )


def _with_attention_hooks(fn, attention):
    """``fn`` as ``hooked(arrays, *args, **kwargs)``: with ``"attention"``-route prompt adapters
    (adaption prompt), ``fn`` runs inside the spec's `run_hooked` (a flax method interceptor
    around each targeted attention module), given the adapters' ``arrays``, which enter the
    trace as inputs so that they are differentiated like any adapter array."""
    if not attention:
        return lambda arrays, *a, **k: fn(*a, **k)

    def hooked(arrays, *a, **k):
        spec = attention[0][1]
        targets = [(m, s, x) for (m, s, _), x in zip(attention, arrays, strict=True)]
        return spec.run_hooked(targets, fn, a, k)

    return hooked


def _scale_of(spec: Spec):
    if spec.layout.stack:
        return spec.scale_array().reshape(spec.layout.stack_shape(spec.shape))
    return jnp.float32(spec.scaling[0])


def apply(fn, *, rng: jax.Array | None = None, adapter_ids=None):
    """Wrap ``fn`` so that adapter-carrying arguments act as adapted weights.

    Args:
      fn: any JAX-traceable function, e.g. ``model.apply``, ``lambda p, ids: hf(ids, params=p)``
        or a function that rebuilds an nnx model with ``nnx.merge(graphdef, state)``.
      rng: PRNG key for adapter dropout (training). ``None`` (default): dropout off.
      adapter_ids: a mixed-adapter batch (HF PEFT's ``adapter_names=`` forward argument):
        example ``i`` (along the leading batch axis of the model's inputs) runs with adapter
        ``adapter_ids[i]``, a name (``None``: the base model), whatever the active set. Or a 1-D
        int array of indices into ``pj.adapter_names(params)`` (``-1``: the base), which may be
        traced: one compiled function then serves any mix. Every loaded, unmerged adapter is
        available; the adapters of a module are stacked (LoRA ranks zero-padded to the
        largest) and each example's are gathered, so the cost is one rank-``r`` pass, not one
        pass per adapter. Gradients reach each adapter from its own examples only. LoRA, DoRA,
        IA3, LoKr, LoHa, VeRA, OFT...: any method with a factored forward; prompt learning,
        LN tuning, ``modules_to_save`` and IA3 on a biased layer are refused by name.

    Returns:
      A function with ``fn``'s signature. It composes with ``jit``, ``grad``, ``vmap``, remat
      and scanned layers. The errors below are raised when it is called.

    Raises:
      AdapterNameError: an unknown name (or an out-of-range concrete index) in ``adapter_ids``,
        or ``adapter_ids`` with arguments that carry no adapter.
      TypeError: ``adapter_ids`` is a single str, or neither a list of names nor a 1-D integer
        array.
      ValueError: ``adapter_ids`` is an empty list.
      UnsupportedModuleError: with ``adapter_ids``, a method that cannot be batched, merged
        adapters, or a weight used other than as a matmul / lookup (or not with the batch axis
        leading); a prompt-learning adapter on an embedding the function does not read as a
        row lookup, or active with other adapters there.
      LayoutError: ``fn`` uses a dense weight only in the other orientation than the one
        `pj.inject` read (inject with ``layouts=``).

    Example:

      >>> import jax, jax.numpy as jnp, peftjax as pj
      >>> cfg = pj.LoraConfig(r=1, target_modules=["w"])
      >>> p = pj.inject({"w": jnp.eye(3)}, cfg, key=jax.random.key(0))
      >>> pj.apply(lambda p, x: x @ p["w"])(p, jnp.ones((2, 3))).shape
      (2, 3)
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if adapter_ids is None:
            vals, binds, treedef, attention = _prepare((args, kwargs))
        else:
            vals, binds, treedef, attention = _prepare_mixed((args, kwargs), adapter_ids)
        hooked = _with_attention_hooks(fn, attention)
        if not any(b is not None for b in binds) and not any(map(is_quantized, vals)):
            a, k = jax.tree_util.tree_unflatten(treedef, vals)
            return hooked([a for _, _, a in attention], *a, **k)
        dyn_idx = [i for i, v in enumerate(vals) if _is_array(v)]
        static = list(vals)

        out_info: dict = {}
        n_dyn = len(dyn_idx)

        def flat_fn(*dyn):
            full = list(static)
            for i, d in zip(dyn_idx, dyn[:n_dyn], strict=True):
                full[i] = d
            a, k = jax.tree_util.tree_unflatten(treedef, full)
            # Non-array outputs (strings, None, ints...) are kept out of the trace and put back.
            leaves, out_info["tree"] = jax.tree_util.tree_flatten(hooked(dyn[n_dyn], *a, **k))
            out_info["static"] = [_ARRAY if _is_array(x) else x for x in leaves]
            return [x for x in leaves if _is_array(x)]

        dyn = [vals[i] for i in dyn_idx]
        # the attention-route arrays enter the trace as inputs (never as constants: grads)
        extra = [a for _, _, a in attention]
        closed = jax.make_jaxpr(flat_fn)(*_traceable(dyn), extra)
        arg_tags = [
            _Tag(binds[i], vals[i].dtype) if binds[i] is not None else None for i in dyn_idx
        ]
        arg_tags += [None] * len(jax.tree_util.tree_leaves(extra))
        dyn = dyn + jax.tree_util.tree_leaves(extra)
        interp = _Interp(rng)
        outs = iter(interp.run(closed.jaxpr, closed.consts, dyn, arg_tags))
        _check_orientation(interp.uses)
        leaves = [next(outs) if x is _ARRAY else x for x in out_info["static"]]
        return jax.tree_util.tree_unflatten(out_info["tree"], leaves)

    return wrapped
