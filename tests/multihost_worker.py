"""One process of the multi-host LoRA run that `tests/test_multihost.py` launches.

Usage::

    python tests/multihost_worker.py multi <process_id> <num_processes> <port> <ckpt_dir> <out_json>
    python tests/multihost_worker.py single <ckpt_dir> <out_json>

``multi``: one of ``num_processes`` (2) processes on 127.0.0.1, each with 2 local CPU devices
and gloo CPU collectives, joined by ``jax.distributed.initialize``; the global mesh is
``("data", "model") = (2, 2)`` over the 4 devices, so ``"data"`` runs across the processes.
``single``: the reference, one process on one CPU device (a ``(1, 1)`` mesh, the same code).

Both build the tiny HF Flax Llama of ``tests/fixtures/peft/llama_lora``, put its base weights on
the mesh (kernels ``P("data", "model")``: every weight is split across the processes), load the
HF PEFT adapter with ``pj.load_pretrained`` on each process, check where the adapter arrays went
and that they hold the file's values, run 3 jitted Adam steps on a batch sharded over
``"data"``, save an `AdapterCheckpointer` checkpoint from every process, restore it into a
freshly loaded tree, check it equals the trained state, and run 2 more steps from both the
restored and the uninterrupted state. Process 0 writes the losses and the final adapter
arrays (gathered to the host) to ``out_json``. Any failed check exits non-zero.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the device count must be set before jax starts its backend
    _mode = sys.argv[1]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={2 if _mode == 'multi' else 1}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "peft" / "llama_lora"
STEPS, MORE = 3, 2
LR = 1e-2
BATCH, SEQ = 4, 8


def base_numpy() -> dict:
    """The fixture's torch base weights as HF Flax Llama params (numpy, host memory)."""
    from safetensors.numpy import load_file

    out: dict = {}
    for k, v in load_file(str(FIX / "base.safetensors")).items():
        *mods, p = k.split(".")
        node = out
        for m in mods:
            node = node.setdefault(m, {})
        if v.ndim == 2 and mods[-1] == "embed_tokens":
            node["embedding"] = v
        elif v.ndim == 2:
            node["kernel"] = np.ascontiguousarray(v.T)
        else:
            node[p] = v
    return out


def global_array(x: np.ndarray, sharding):
    """``x`` (the same on every process) as a global array: each process fills its shards."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def check_shards(a, full: np.ndarray, what: str) -> None:
    """Every shard this process holds of global array ``a`` is that block of ``full``."""
    assert tuple(a.shape) == full.shape, (what, a.shape, full.shape)
    for s in a.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index], err_msg=what)


def same_global(a, b, what: str) -> None:
    """``a`` and ``b`` are equal global arrays with the same sharding (shard by shard)."""
    assert a.sharding == b.sharding, (what, a.sharding, b.sharding)
    for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
        assert sa.index == sb.index and sa.device == sb.device, what
        np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data), err_msg=what)


def run(mesh, ckpt_dir: str, multi: bool) -> dict:
    import optax
    import transformers
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from safetensors.numpy import load_file

    import peftjax as pj
    from peftjax.checkpoint import AdapterCheckpointer

    t0 = time.time()
    cfg = json.loads((FIX / "llama_config.json").read_text())
    model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(**cfg), _do_init=False)

    weight = NamedSharding(mesh, P("data", "model"))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data", None))

    host = base_numpy()

    def on_mesh():
        return jax.tree.map(lambda x: global_array(x, weight if x.ndim == 2 else replicated), host)

    base = on_mesh()
    q = base["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("data", "model")
    assert q.is_fully_addressable is (not multi), "base weights must span the processes"

    params = pj.load_pretrained(base, FIX)

    # the adapter arrays follow the base kernels' sharding and hold the file's values
    file = load_file(str(FIX / "adapter_model.safetensors"))
    n_checked = 0
    for layer in ("0", "1"):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            node = params["model"]["layers"][layer]["self_attn"][proj]["kernel"]
            assert isinstance(node, pj.Adapted), (layer, proj, type(node))
            arrays = node.arrays["default"]
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            for name, spec in (("lora_A", P("data", None)), ("lora_B", P(None, "model"))):
                a = arrays[name]
                what = f"layer {layer} {proj} {name}"
                assert isinstance(a, jax.Array), (what, type(a))
                if multi:
                    assert isinstance(a.sharding, NamedSharding), (what, a.sharding)
                    assert a.sharding.mesh == mesh, (what, a.sharding)
                    assert a.sharding.spec == spec, (what, a.sharding)
                else:  # one device: any sharding on it is the same (no copy is made)
                    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), what
                assert a.is_fully_addressable is (not multi), what
                check_shards(a, np.ascontiguousarray(file[f"{prefix}.{name}.weight"].T), what)
                n_checked += 1
    assert n_checked == 16
    # `pj.shardings` (read from the concrete tree) names where they are
    said = pj.shardings(params)
    for a, sh in zip(jax.tree.leaves(params), jax.tree.leaves(said), strict=True):
        assert a.sharding.is_equivalent_to(sh, a.ndim), (a.sharding, sh)

    # `pj.inject` of a fresh adapter on the global base: initialised alike on every process
    # (jax's device_put checks that) and placed by the same rule
    injected = pj.inject(base, pj.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), key=0)
    for proj in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        node = injected["model"]["layers"]["1"][proj[0]][proj[1]]["kernel"]
        for name, spec in (("lora_A", P("data", None)), ("lora_B", P(None, "model"))):
            a = node.arrays["default"][name]
            assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (proj, name)
            assert a.is_fully_addressable is (not multi), (proj, name)

    ids_host = np.random.default_rng(0).integers(0, cfg["vocab_size"], (BATCH, SEQ), np.int32)
    ids = global_array(ids_host, batch_sharding)

    forward = pj.apply(lambda p, x: model(x, params=p).logits)
    opt = optax.adam(LR)

    def loss_fn(tr, fr, x):
        logits = forward(pj.combine(tr, fr), x)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean()

    def placed_opt_init(tr):
        state = opt.init(tr)  # mu / nu follow tr's shardings; `count` is a local scalar
        return jax.tree.map(
            lambda x: (
                x
                if isinstance(getattr(x, "sharding", None), NamedSharding)
                and x.sharding.mesh == mesh
                else jax.device_put(np.asarray(x), replicated)
            ),
            state,
        )

    tr, fr = pj.partition(params)
    opt_state = placed_opt_init(tr)
    tr_sh = jax.tree.map(lambda x: x.sharding, tr)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)

    @jax.jit
    def _step(tr, fr, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(tr, fr, x)
        updates, opt_state = opt.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, loss

    step = jax.jit(_step, out_shardings=(tr_sh, opt_sh, replicated))

    losses = []
    for _ in range(STEPS):
        tr, opt_state, loss = step(tr, fr, opt_state, ids)
        losses.append(float(loss))  # a replicated scalar: readable on every process
    trained = pj.combine(tr, fr)

    # every process saves its shards; Orbax's primary host (process 0) finalises the step
    with AdapterCheckpointer(ckpt_dir) as ckpt:
        assert ckpt.save(STEPS, trained, opt_state)
    multihost_utils.sync_global_devices("saved")

    # a fresh load of the same adapter on the same mesh, restored from the checkpoint
    fresh = pj.load_pretrained(on_mesh(), FIX)
    fresh_tr = pj.partition(fresh)[0]
    assert any(  # so that equality below says the checkpoint was read
        not np.array_equal(np.asarray(a.addressable_shards[0].data), b.addressable_shards[0].data)
        for a, b in zip(jax.tree.leaves(tr), jax.tree.leaves(fresh_tr), strict=True)
    )
    with AdapterCheckpointer(ckpt_dir) as ckpt:
        assert ckpt.all_steps() == [STEPS], ckpt.all_steps()
        restored, r_opt, r_step = ckpt.restore(fresh, placed_opt_init(fresh_tr))
    assert r_step == STEPS
    r_tr, r_fr = pj.partition(restored)
    for label, want, got in (("restored ", tr, r_tr), ("restored opt_state ", opt_state, r_opt)):
        for (kp, a), (kp2, b) in zip(
            jax.tree_util.tree_flatten_with_path(want)[0],
            jax.tree_util.tree_flatten_with_path(got)[0],
            strict=True,
        ):
            assert kp == kp2
            same_global(a, b, label + jax.tree_util.keystr(kp))

    # continue: from the restored state and, for comparison, from the uninterrupted one
    resumed, cont = [], []
    st, so = r_tr, r_opt
    ut, uo = tr, opt_state
    for _ in range(MORE):
        st, so, loss = step(st, r_fr, so, ids)
        resumed.append(float(loss))
        ut, uo, loss = step(ut, fr, uo, ids)
        cont.append(float(loss))

    final = {}
    gathered = multihost_utils.process_allgather(st, tiled=True) if multi else st
    for kp, x in jax.tree_util.tree_flatten_with_path(gathered)[0]:
        final[jax.tree_util.keystr(kp)] = np.asarray(x).tolist()
    return dict(
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        losses=losses,
        resumed=resumed,
        continued=cont,
        final=final,
        seconds=time.time() - t0,
    )


def main(argv: list[str]) -> None:
    mode = argv[1]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "multi":
        pid, nproc, port, ckpt_dir, out = int(argv[2]), int(argv[3]), argv[4], argv[5], argv[6]
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=120,
        )
        assert jax.process_count() == nproc and jax.device_count() == 2 * nproc
        assert jax.local_device_count() == 2
    elif mode == "single":
        pid, ckpt_dir, out = 0, argv[2], argv[3]
        assert jax.process_count() == 1 and jax.device_count() == 1
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    # rows of the mesh are processes: "data" runs across them, "model" within one
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = jax.sharding.Mesh(
        np.array(devices).reshape(-1, len(jax.local_devices())), ("data", "model")
    )
    result = run(mesh, ckpt_dir, multi=mode == "multi")
    if pid == 0:
        tmp = out + ".tmp"
        Path(tmp).write_text(json.dumps(result))
        os.replace(tmp, out)
    print(f"process {pid}: OK in {result['seconds']:.1f}s", flush=True)
    if mode == "multi":
        jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BaseException:  # exit now: a normal exit would wait on the peers at shutdown
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
