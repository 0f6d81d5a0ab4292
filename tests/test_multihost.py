"""Multi-host, for real: 2 JAX processes on 127.0.0.1 train, checkpoint and resume a LoRA adapter.

The processes (``tests/multihost_worker.py multi``) join with ``jax.distributed.initialize``
and gloo CPU collectives, 2 CPU devices each, and build a ``("data", "model") = (2, 2)`` mesh
over the 4 devices; the base weights are split across both processes (``P("data", "model")``)
and the HF PEFT adapter of ``tests/fixtures/peft/llama_lora`` is loaded on each. They run
sharded Adam steps, save an `AdapterCheckpointer` checkpoint from both processes, restore it
into a fresh load and continue. A third process (``single``) runs the same computation on one
device; the losses and the final adapter arrays must agree. The worker itself checks the
adapter arrays' shardings and values, and that the restored state equals the trained one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().with_name("multihost_worker.py")
TIMEOUT_S = 240  # all three processes together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as err:
        return f"<no log: {err}>"


def _stop(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and anything it started (its own process group), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass


def test_two_processes_train_checkpoint_and_match_one(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("optax")
    pytest.importorskip("orbax.checkpoint")
    if not hasattr(transformers, "FlaxLlamaForCausalLM"):
        pytest.skip("this transformers has no Flax Llama")

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    port = _free_port()
    multi_out, single_out = tmp_path / "multi.json", tmp_path / "single.json"
    jobs = {
        "process 0": ["multi", "0", "2", str(port), str(tmp_path / "ckpt"), str(multi_out)],
        "process 1": ["multi", "1", "2", str(port), str(tmp_path / "ckpt"), str(multi_out)],
        "single": ["single", str(tmp_path / "ckpt_single"), str(single_out)],
    }
    logs = {name: tmp_path / f"{name.replace(' ', '')}.log" for name in jobs}
    procs: dict[str, subprocess.Popen] = {}
    start = time.monotonic()
    try:
        for name, args in jobs.items():
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(WORKER), *args],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as one
                )
        deadline = start + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs.values()]  # poll every one (no short-circuit)
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                break  # a peer that died leaves the other waiting: stop them all
            time.sleep(0.2)
    finally:
        for p in procs.values():
            _stop(p)
    elapsed = time.monotonic() - start
    report = "\n".join(
        f"--- {name} (rc {procs[name].returncode}) ---\n{_tail(logs[name])}" for name in procs
    )
    assert all(p.returncode == 0 for p in procs.values()), (
        f"workers failed or ran past {TIMEOUT_S}s (after {elapsed:.0f}s):\n{report}"
    )
    for name in ("process 0", "process 1"):
        assert f"{name}: OK" in _tail(logs[name]), report

    multi = json.loads(multi_out.read_text())
    single = json.loads(single_out.read_text())
    assert (multi["process_count"], multi["device_count"], multi["local_device_count"]) == (2, 4, 2)
    assert (single["process_count"], single["device_count"]) == (1, 1)

    # the sharded 2-process run computes what one device does
    for key in ("losses", "resumed", "continued"):
        np.testing.assert_allclose(multi[key], single[key], rtol=1e-5, err_msg=key)
    # resuming from the checkpoint continues exactly as the uninterrupted run
    np.testing.assert_allclose(multi["resumed"], multi["continued"], rtol=1e-6)
    # training works: the loss goes down every step, across the save / restore too
    curve = multi["losses"] + multi["resumed"]
    assert all(b < a for a, b in zip(curve, curve[1:])), curve
    assert sorted(multi["final"]) == sorted(single["final"]) and len(multi["final"]) == 16
    for k, v in multi["final"].items():
        np.testing.assert_allclose(v, single["final"][k], rtol=1e-4, atol=1e-5, err_msg=k)

    # both processes wrote their shards into the one checkpoint
    step_dir = tmp_path / "ckpt" / "3"
    assert (step_dir / "_CHECKPOINT_METADATA").exists(), sorted(os.listdir(tmp_path / "ckpt"))
    for item in ("adapters", "opt_state"):
        written = sorted(p.name for p in (step_dir / item).glob("ocdbt.process_*"))
        assert written == ["ocdbt.process_0", "ocdbt.process_1"], (item, written)
