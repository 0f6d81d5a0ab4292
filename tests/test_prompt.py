"""Prompt learning and adaption prompt against real HF PEFT (fixtures made by
``tests/fixtures/make_peft_fixtures_prompt.py``: tiny Llama, GPT-2 and BERT through
transformers' Flax models), plus training, generation, files and bad input."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import unflatten_dict
from safetensors.numpy import load_file

import peftjax as pj
from tests.conftest import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")

FIX = Path(__file__).parent / "fixtures" / "peft" / "prompt"
FLAX = {
    "LlamaForCausalLM": ("LlamaConfig", "FlaxLlamaForCausalLM"),
    "GPT2LMHeadModel": ("GPT2Config", "FlaxGPT2LMHeadModel"),
    "BertForSequenceClassification": ("BertConfig", "FlaxBertForSequenceClassification"),
}


@cache
def model_of(case: str):
    cfg = json.loads((FIX / case / "model_config.json").read_text())
    conf_cls, model_cls = FLAX[cfg.pop("model_class")]
    config = getattr(transformers, conf_cls)(**cfg)
    return getattr(transformers, model_cls)(config, _do_init=False)


def base_of(case: str) -> dict:
    """The case's base params: transformers' Flax params, saved with '/'-joined keys."""
    flat = load_file(str(FIX / case / "flax_base.safetensors"))
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def io_of(case: str) -> dict:
    return {k: np.asarray(v) for k, v in load_file(str(FIX / case / "io.safetensors")).items()}


def logits_fn(case: str):
    model = model_of(case)
    return jax.jit(pj.apply(lambda p, b: model(**b, params=p).logits))


def batch_of(case: str, params, io: dict):
    kw = {"model": model_of(case)}
    if "task_ids" in io:
        kw["task_ids"] = jnp.asarray(io["task_ids"], jnp.int32)
    if "token_type_ids" in io:
        kw["token_type_ids"] = jnp.asarray(io["token_type_ids"], jnp.int32)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    mask = jnp.asarray(io["attention_mask"], jnp.int32)
    if io["labels"].shape == ids.shape:  # causal LM: labels padded with -100 as PEFT pads them
        kw["labels"] = jnp.asarray(io["labels"], jnp.int32)
    return pj.prompt_inputs(params, ids, mask, **kw)


def assert_peft_logits(case: str, got, io: dict, atol=1e-4):
    """PEFT's logits on the positions that are not padding (padded query rows are arbitrary)."""
    want = io["logits"]
    got = np.asarray(got)
    assert got.shape == want.shape
    if got.ndim == 2:  # sequence classification
        np.testing.assert_allclose(got, want, atol=atol, rtol=1e-4)
        return
    mask = io["attention_mask"].astype(bool)
    extra = got.shape[1] - mask.shape[1]  # virtual-token positions (always attended)
    valid = np.concatenate([np.ones((mask.shape[0], extra), bool), mask], axis=1)
    np.testing.assert_allclose(got[valid], want[valid], atol=atol, rtol=1e-4)


TOKEN_CASES = [
    "llama_prompt_tuning",
    "gpt2_prompt_tuning",
    "bert_prompt_tuning_seqcls",
    "llama_mpt",
    "llama_mpt_exact_source",
    "llama_mpt_average_source",
]
PTUNING_CASES = ["llama_p_tuning_mlp", "llama_p_tuning_lstm"]
PREFIX_CASES = ["llama_prefix", "llama_prefix_proj", "gpt2_prefix"]
ALL_CASES = TOKEN_CASES + PTUNING_CASES + PREFIX_CASES + ["llama_adaption_prompt"]


@pytest.mark.parametrize("case", ALL_CASES)
def test_peft_file_gives_peft_logits(case):
    params, io = base_of(case), io_of(case)
    snap = snapshot(params)
    loaded = pj.load_pretrained(params, FIX / case)
    assert_unchanged(snap, params)
    batch = batch_of(case, loaded, io)
    labels = batch.pop("labels", None)
    got = logits_fn(case)(loaded, batch)
    assert_peft_logits(case, got, io)
    # PEFT's loss (virtual positions have label -100). It reads the logits of row 1's left
    # pad, a query that attends nothing (torch and XLA fill such rows differently) unless a
    # prefix or virtual tokens give it something to attend: adaption prompt has neither.
    if labels is not None and "adaption" not in case:
        np.testing.assert_allclose(float(_causal_loss(got, labels)), float(io["loss"]), rtol=1e-4)
    # the base model is untouched by the adapter's presence: unload gives PEFT's base logits
    base = pj.unload(loaded)
    want = io["logits_base"]
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    mask = jnp.asarray(io["attention_mask"], jnp.int32)
    kw = {"token_type_ids": jnp.asarray(io["token_type_ids"])} if "token_type_ids" in io else {}
    got = np.asarray(model_of(case)(ids, attention_mask=mask, params=base, **kw).logits)
    valid = io["attention_mask"].astype(bool) if want.ndim == 3 else slice(None)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ALL_CASES)
def test_save_gives_peft_files(case, tmp_path):
    params = base_of(case)
    loaded = pj.load_pretrained(params, FIX / case)
    out = pj.save_pretrained(loaded, tmp_path)
    want = load_file(str(FIX / case / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # the config PEFT wrote and the one peftjax writes agree on every field that shapes the math
    fix = json.loads((FIX / case / "adapter_config.json").read_text())
    mine = json.loads((out / "adapter_config.json").read_text())
    for k, v in fix.items():
        if k == "modules_to_save":  # PEFT lists the seq-cls heads twice
            assert sorted(set(mine[k] or ())) == sorted(set(v or ()))
            continue
        if k == "prompt_tuning_init_state_dict_path":
            continue
        assert mine.get(k) == v, k
    # and loading the saved files again gives the same arrays
    again = pj.load_pretrained(params, out)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mpt_source_inits_give_peft_arrays(tmp_path):
    """PEFT's EXACT_SOURCE_TASK / AVERAGE_SOURCE_TASKS inits from llama_mpt's file."""
    src = str(FIX / "llama_mpt" / "adapter_model.safetensors")
    params = base_of("llama_mpt")
    for case, init in (
        ("llama_mpt_exact_source", "EXACT_SOURCE_TASK"),
        ("llama_mpt_average_source", "AVERAGE_SOURCE_TASKS"),
    ):
        cfg = pj.MultitaskPromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=3,
            num_tasks=1,
            num_ranks=2,
            prompt_tuning_init=init,
            prompt_tuning_init_state_dict_path=src,
            prompt_tuning_init_task=1,
        )
        p = pj.inject(params, cfg, key=jax.random.key(0))
        arrays = p["model"]["embed_tokens"]["embedding"].arrays["default"]
        want = load_file(str(FIX / case / "adapter_model.safetensors"))
        for k, v in want.items():
            np.testing.assert_allclose(np.asarray(arrays[k]), v, atol=1e-7, err_msg=(case, k))
    with pytest.raises(pj.ConfigError, match="safetensors"):
        pj.MultitaskPromptTuningConfig(
            num_virtual_tokens=3,
            prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path="source.bin",
        )
    with pytest.raises(pj.ConfigError, match="num_tasks"):
        pj.MultitaskPromptTuningConfig(
            num_virtual_tokens=3,
            num_tasks=2,
            prompt_tuning_init="EXACT_SOURCE_TASK",
            prompt_tuning_init_state_dict_path=src,
        )


# ------------------------------------------------------------------------------ training


def _causal_loss(logits, labels):
    """Mean next-token cross entropy over labels != -100 (HF's shift)."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    ok = lb != -100
    ll = optax.softmax_cross_entropy_with_integer_labels(lg, jnp.where(ok, lb, 0))
    return jnp.sum(jnp.where(ok, ll, 0.0)) / jnp.maximum(ok.sum(), 1)


@pytest.mark.slow  # the default run trains every method in the PROMPT_CASES test below
@pytest.mark.parametrize("case", ["llama_prompt_tuning", "llama_mpt"])
def test_loss_matches_peft_and_falls_with_only_the_prompt_training(case):
    params, io = base_of(case), io_of(case)
    model = model_of(case)
    loaded = pj.load_pretrained(params, FIX / case)
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    mask = jnp.asarray(io["attention_mask"], jnp.int32)
    labels = jnp.asarray(io["labels"], jnp.int32)
    kw = {"task_ids": jnp.asarray(io["task_ids"], jnp.int32)} if "task_ids" in io else {}
    fwd = pj.apply(lambda p, b: model(b["input_ids"], b["attention_mask"], params=p).logits)

    def loss_fn(trainable, frozen):
        p = pj.combine(trainable, frozen)
        b = pj.prompt_inputs(p, ids, mask, labels=labels, **kw)
        return _causal_loss(fwd(p, b), b["labels"])

    trainable, frozen = pj.partition(loaded)
    l0 = float(loss_fn(trainable, frozen))
    np.testing.assert_allclose(l0, float(io["loss"]), rtol=1e-4)  # PEFT's loss (labels -100'd)
    opt = optax.adam(1e-1)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s):
        loss, g = jax.value_and_grad(loss_fn)(t, frozen)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    t = trainable
    for _ in range(20):
        t, state, loss = step(t, state)
    assert float(loss_fn(t, frozen)) < 0.85 * l0
    after = pj.combine(t, frozen)
    # only the prompt arrays moved; every base weight is bit-identical
    assert_unchanged(snapshot(params), pj.unload(after))
    before = loaded["model"]["embed_tokens"]["embedding"].arrays["default"]
    moved = after["model"]["embed_tokens"]["embedding"].arrays["default"]
    assert all(not np.array_equal(before[k], moved[k]) for k in before)


# ------------------------------------------------------------------------------ generation


def greedy(fwd, params, ids, n: int, **kw):
    """Greedy decoding by full recompute: ``n`` new tokens after ``ids`` ``[1, N]``."""
    for _ in range(n):
        b = pj.prompt_inputs(params, ids, jnp.ones_like(ids), **kw)
        nxt = jnp.argmax(fwd(params, b)[:, -1], axis=-1)
        ids = jnp.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
    return ids


GEN_CASES = ["llama_prompt_tuning", "llama_prefix"] + [
    pytest.param(c, marks=pytest.mark.slow)
    for c in ("gpt2_prompt_tuning", "gpt2_prefix", "llama_mpt", "llama_adaption_prompt")
]


@pytest.mark.parametrize("case", GEN_CASES)
def test_greedy_generation_matches_peft_generate(case):
    """PEFT's ``generate(do_sample=False)`` tokens, by greedy decoding through `pj.apply`."""
    params, io = base_of(case), io_of(case)
    loaded = pj.load_pretrained(params, FIX / case)
    ids = jnp.asarray(io["gen_input_ids"], jnp.int32)
    want = io["generated"]
    kw = {"model": model_of(case)}
    if "gen_task_ids" in io:
        kw["task_ids"] = jnp.asarray(io["gen_task_ids"], jnp.int32)
    got = greedy(logits_fn(case), loaded, ids, want.shape[1] - ids.shape[1], **kw)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.array_equal(want, io["generated_base"])  # the adapter changes the tokens


# ------------------------------------------------------------------------------ contracts


def test_prompt_adapters_cannot_merge_and_do_not_touch_the_weights():
    params = base_of("llama_prompt_tuning")
    p = pj.load_pretrained(params, FIX / "llama_prompt_tuning")
    with pytest.raises(pj.MergeError, match="prompt_tuning.*cannot be merged"):
        pj.merge(p)
    with pytest.raises(pj.MergeError, match="cannot be merged"):
        pj.merge_and_unload(p)
    assert_unchanged(snapshot(params), pj.unload(p))
    # without an active prompt adapter the inputs pass through unchanged
    ids = jnp.array([[3, 4, 5]])
    assert set(pj.prompt_inputs(params, ids)) == {"input_ids"}
    off = pj.set_active(p, [])
    np.testing.assert_array_equal(pj.prompt_inputs(off, ids)["input_ids"], ids)


def test_prompt_inputs_extends_mask_labels_and_token_types_as_peft():
    p = pj.inject(
        {"embed": {"embedding": jnp.ones((10, 4))}},
        pj.PromptTuningConfig(num_virtual_tokens=2),
        key=jax.random.key(0),
    )
    ids = jnp.array([[3, 4, 5]])
    b = pj.prompt_inputs(
        p,
        ids,
        jnp.array([[0, 1, 1]]),
        labels=jnp.array([[-100, 4, 5]]),
        token_type_ids=jnp.array([[1, 1, 1]]),
    )
    assert b["input_ids"].tolist() == [[10, 11, 3, 4, 5]]
    assert b["attention_mask"].tolist() == [[1, 1, 0, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, -100, 4, 5]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1, 1, 1]]
    # traceable: one compiled function serves any ids
    f = jax.jit(lambda p, i: pj.prompt_inputs(p, i)["input_ids"])
    assert f(p, ids).shape == (1, 5)


def test_bad_input_names_the_field():
    params = base_of("llama_prompt_tuning")
    snap = snapshot(params)
    for bad, field in (
        (dict(num_virtual_tokens=0), "num_virtual_tokens"),
        (dict(num_virtual_tokens=-2), "num_virtual_tokens"),
        (dict(), "num_virtual_tokens"),
        (
            dict(
                num_virtual_tokens=2,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="ab",
                tokenizer_name_or_path="tok",
                prompt_tuning_init_ids=[1, 2, 3],
            ),
            "prompt_tuning_init_ids",
        ),
        (dict(num_virtual_tokens=2, prompt_tuning_init="TEXT"), "tokenizer_name_or_path"),
        (
            dict(num_virtual_tokens=2, prompt_tuning_init="TEXT", tokenizer_name_or_path="t"),
            "prompt_tuning_init_text",
        ),
        (dict(num_virtual_tokens=2, tokenizer_kwargs={"a": 1}), "tokenizer_kwargs"),
        (dict(num_virtual_tokens=2, num_transformer_submodules=2), "num_transformer_submodules"),
    ):
        with pytest.raises(pj.ConfigError, match=field):
            pj.PromptTuningConfig(**bad)
    with pytest.raises(pj.ConfigError, match="prompt_tuning_init_ids"):  # when it is needed
        text = dict(prompt_tuning_init_text="ab", tokenizer_name_or_path="tok")
        cfg = pj.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", **text)
        pj.inject(params, cfg, key=0)
    with pytest.raises(pj.ShapeError, match="token_dim"):
        pj.inject(params, pj.PromptTuningConfig(num_virtual_tokens=2, token_dim=7), key=0)
    mpt = pj.inject(
        params, pj.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=2), key=0
    )
    ids = jnp.array([[3, 4]])
    with pytest.raises(pj.ConfigError, match="task_ids"):
        pj.prompt_inputs(mpt, ids)
    with pytest.raises(pj.ConfigError, match="task_ids.*tasks 0..1"):
        pj.prompt_inputs(mpt, ids, task_ids=jnp.array([2]))
    with pytest.raises(pj.ShapeError, match="task_ids"):
        pj.prompt_inputs(mpt, ids, task_ids=jnp.array([0, 1]))
    with pytest.raises(pj.ShapeError, match="attention_mask"):
        pj.prompt_inputs(mpt, ids, jnp.ones((1, 3)), task_ids=jnp.array([0]))
    pt = pj.inject(params, pj.PromptTuningConfig(num_virtual_tokens=2), key=0)
    with pytest.raises(pj.ConfigError, match="task_ids"):
        pj.prompt_inputs(pt, ids, task_ids=jnp.array([0]))
    # an ambiguous tree: two embedding tables, neither named like a token embedding
    two = {"a": {"embedding": jnp.ones((5, 3))}, "b": {"embedding": jnp.ones((6, 3))}}
    with pytest.raises(pj.TargetError, match="target_modules"):
        pj.inject(two, pj.PromptTuningConfig(num_virtual_tokens=2), key=0)
    picked = pj.inject(
        two, pj.PromptTuningConfig(num_virtual_tokens=2, target_modules=["b"]), key=0
    )
    assert pj.targeted_modules(picked) == ["b"]
    assert_unchanged(snap, params)


def test_text_init_takes_the_token_rows_and_repeats_them():
    table = jnp.arange(40.0).reshape(10, 4)
    cfg = pj.PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="ab",
        tokenizer_name_or_path="tok",
        prompt_tuning_init_ids=[7, 2],
    )
    p = pj.inject({"embed_tokens": {"embedding": table}}, cfg, key=0)
    got = p["embed_tokens"]["embedding"].arrays["default"]["prompt_embeddings"]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(table)[[7, 2, 7, 2, 7]])
    sv = pj.inject(
        {"embed_tokens": {"embedding": table}},
        pj.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
        key=1,
    )
    rows = np.asarray(sv["embed_tokens"]["embedding"].arrays["default"]["prompt_embeddings"])
    assert all(any(np.array_equal(r, t) for t in np.asarray(table)) for r in rows)


def test_linen_and_nnx_models_take_virtual_tokens_unchanged():
    """Any model whose token embedding is a table lookup: linen nn.Embed and nnx.Embed."""
    import flax.linen as nn
    from flax import nnx

    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(3)(nn.Embed(11, 4, name="embed_tokens")(ids).mean(1))

    m = M()
    ids = jnp.array([[1, 2, 3]])
    params = m.init(jax.random.key(0), ids)
    p = pj.inject(params, pj.PromptTuningConfig(num_virtual_tokens=2), key=1)
    b = pj.prompt_inputs(p, ids)
    got = pj.apply(lambda p, b: m.apply(p, b["input_ids"]))(p, b)
    P = p["params"]["embed_tokens"]["embedding"].arrays["default"]["prompt_embeddings"]
    E = params["params"]["embed_tokens"]["embedding"]
    x = jnp.concatenate([P, E[ids[0]]])[None].mean(1)
    d = params["params"]["Dense_0"]
    np.testing.assert_allclose(got, x @ d["kernel"] + d["bias"], atol=1e-6)

    class N(nnx.Module):
        def __init__(self):
            self.embed_tokens = nnx.Embed(11, 4, rngs=nnx.Rngs(0))

        def __call__(self, ids):
            return self.embed_tokens(ids).sum(1)

    gdef, state = nnx.split(N())
    q = pj.inject(state, pj.PromptTuningConfig(num_virtual_tokens=2), key=1)
    out = pj.apply(lambda s, i: nnx.merge(gdef, s)(i))(q, pj.prompt_inputs(q, ids)["input_ids"])
    P = pj.partition(q)[0]["embed_tokens"]["embedding"].arrays["default"]["prompt_embeddings"]
    E2 = state["embed_tokens"]["embedding"][...]
    np.testing.assert_allclose(out, (P.sum(0) + E2[ids[0]].sum(0))[None], atol=1e-5)


def test_an_unsupported_lookup_is_an_error_not_garbage():
    p = pj.inject(
        {"embed": {"embedding": jnp.ones((10, 4))}},
        pj.PromptTuningConfig(num_virtual_tokens=2),
        key=0,
    )
    b = pj.prompt_inputs(p, jnp.array([[3, 4]]))
    with pytest.raises(pj.UnsupportedModuleError, match="row lookup"):
        pj.apply(lambda p, i: p["embed"]["embedding"].T[:, i])(p, b["input_ids"])


def test_files_with_wrong_shapes_are_refused(tmp_path):
    params = base_of("llama_prompt_tuning")
    d = tmp_path / "bad"
    d.mkdir()
    cfg = json.loads((FIX / "llama_prompt_tuning" / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    src = FIX / "llama_prompt_tuning" / "adapter_model.safetensors"
    (d / "adapter_model.safetensors").write_bytes(src.read_bytes())
    snap = snapshot(params)
    with pytest.raises(pj.ShapeError, match="prompt_embeddings"):
        pj.load_pretrained(params, d)
    assert_unchanged(snap, params)
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]


# ------------------------------------------------------------------------------ every method

from tests.cases import PROMPT_CASES  # noqa: E402

BASE = "llama_prompt_tuning"  # the fixtures' tiny Llama (any of the Llama cases: one base)


def _dicts(tree) -> list[int]:
    """ids of every dict inside ``tree`` (its mutable containers)."""
    out, stack = [], [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            out.append(id(x))
            stack.extend(x.values())
        elif isinstance(x, pj.Adapted):
            stack.append(x.arrays)
    return out


def _prompt_arrays(p) -> dict:
    """``{leaf path: adapter arrays}`` of every node carrying the ``default`` adapter."""
    leaves = jax.tree_util.tree_leaves_with_path(p, is_leaf=lambda x: isinstance(x, pj.Adapted))
    return {
        jax.tree_util.keystr(k): x.arrays["default"]
        for k, x in leaves
        if isinstance(x, pj.Adapted) and "default" in x.arrays
    }


#: one row per route and encoder in the default run; the other variants with -m slow
_SLOW_ROWS = ("prompt_tuning-text", "p_tuning-mlp", "prefix_tuning-plain")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c.name in _SLOW_ROWS else c for c in PROMPT_CASES],
    ids=str,
)
def test_every_prompt_method_trains_saves_loads_and_checkpoints(case, tmp_path):
    params, model, io = base_of(BASE), model_of(BASE), io_of(BASE)
    snap = snapshot(params)
    p = pj.inject(params, case.config, key=jax.random.key(1))
    assert_unchanged(snap, params)  # pure: the input is untouched ...
    assert not set(_dicts(p)) & set(_dicts(params))  # ... and shares no container with the output
    with pytest.raises(pj.MergeError, match=case.config.method):
        pj.merge(p)

    ids = jnp.asarray(io["input_ids"], jnp.int32)
    mask = jnp.asarray(io["attention_mask"], jnp.int32)
    labels = jnp.asarray(io["labels"], jnp.int32)
    kw = {"task_ids": jnp.array([2, 0])} if case.config.method == "multitask_prompt_tuning" else {}

    def logits(p, rng=None):
        b = pj.prompt_inputs(p, ids, mask, labels=labels, model=model, **kw)
        lab = b.pop("labels")
        return pj.apply(lambda q, b: model(**b, params=q).logits, rng=rng)(p, b), lab

    def loss_fn(trainable, frozen, rng):
        out, lab = logits(pj.combine(trainable, frozen), rng)
        return _causal_loss(out, lab)

    # only the prompt arrays train, counted as PEFT counts them (every array of the adapter)
    trainable, frozen = pj.partition(p)
    arrays = _prompt_arrays(p)
    n = sum(int(np.prod(a.shape)) for d in arrays.values() for a in d.values())
    assert pj.count_parameters(p)[0] == n > 0
    assert pj.count_parameters(p)[1] == n + pj.count_parameters(params)[1]

    opt = optax.adam(5e-2)
    state = opt.init(trainable)

    @jax.jit
    def step(t, s, rng):
        loss, g = jax.value_and_grad(loss_fn)(t, frozen, rng)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    l0 = float(loss_fn(trainable, frozen, None))
    t = trainable
    for i in range(12):
        t, state, _ = step(t, state, jax.random.key(i))
    trained = pj.combine(t, frozen)
    assert float(loss_fn(t, frozen, None)) < l0 - 0.05
    assert_unchanged(snap, pj.unload(trained))  # every base weight bit for bit
    for path, before in arrays.items():
        after = _prompt_arrays(trained)[path]
        assert all(not np.array_equal(before[k], after[k]) for k in before), path

    # files: PEFT's layout; loading them back gives the trained adapter's eval logits
    want = np.asarray(logits(trained)[0])
    out = pj.save_pretrained(trained, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == case.config.peft_type and cfg["inference_mode"] is True
    if case.config.route == "prefix":  # PEFT reads the prefix with these (GQA: the KV heads)
        assert (cfg["num_layers"], cfg["token_dim"], cfg["num_attention_heads"]) == (2, 16, 2)
    loaded = pj.load_pretrained(params, out)
    np.testing.assert_allclose(np.asarray(logits(loaded)[0]), want, atol=2e-5, rtol=1e-5)

    # Orbax checkpoints of the training state restore into a fresh injection
    with pj.AdapterCheckpointer(tmp_path / "ckpt") as ck:
        ck.save(12, trained, state)
        ck.wait_until_finished()
        fresh = pj.inject(params, case.config, key=jax.random.key(7))
        back, _, step_back = ck.restore(fresh, opt.init(pj.partition(fresh)[0]))
    assert step_back == 12
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "case", [c for c in PROMPT_CASES if c.name in ("prompt_tuning-random", "prefix_tuning-plain")]
)
def test_prompt_adapters_on_a_mesh(case):
    """On a sharded base the prompt arrays are replicated and the step runs under jit."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    params, model, io = base_of(BASE), model_of(BASE), io_of(BASE)
    specs = jax.tree_util.tree_map_with_path(
        lambda k, x: PS(None, "model") if x.ndim == 2 else None, params
    )
    sharded = jax.device_put(params, pj.shardings(params, specs, mesh=mesh))
    p = pj.inject(sharded, case.config, key=jax.random.key(1))
    for d in _prompt_arrays(p).values():
        for a in d.values():
            assert a.sharding.is_fully_replicated
    ids = jax.device_put(jnp.asarray(io["input_ids"], jnp.int32), NamedSharding(mesh, PS("data")))

    @jax.jit
    def f(p, ids):
        b = pj.prompt_inputs(p, ids, model=model)
        return pj.apply(lambda q, b: model(**b, params=q).logits)(p, b)

    host = pj.inject(params, case.config, key=jax.random.key(1))
    np.testing.assert_allclose(np.asarray(f(p, ids)), np.asarray(f(host, ids)), atol=1e-5)


def test_merge_cli_refuses_prompt_adapters(tmp_path, capsys):
    from safetensors.numpy import save_file

    from peftjax import cli

    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {"model.embed_tokens.weight": np.ones((64, 32), np.float32)}, base / "model.safetensors"
    )
    for case in ("llama_prefix", "llama_adaption_prompt"):
        out = tmp_path / f"out_{case}"
        rc = cli.main(
            ["merge", "--base", str(base), "--adapter", str(FIX / case), "--out", str(out)]
        )
        assert rc != 0 and not out.exists()
        assert "nothing to merge" in capsys.readouterr().err
    assert cli.main(["inspect", str(FIX / "llama_prefix")]) == 0
    assert "PREFIX_TUNING" in capsys.readouterr().out


def test_sequence_classification_trains_the_head_as_modules_to_save(tmp_path):
    """``task_type="SEQ_CLS"``: the classifier trains beside the prompt (PEFT adds ``classifier``
    and ``score`` to ``modules_to_save``) and is saved under PEFT's ``base_model.`` keys."""
    case = "bert_prompt_tuning_seqcls"
    params, model, io = base_of(case), model_of(case), io_of(case)
    cfg = pj.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    assert cfg.modules_to_save == ("classifier", "score")
    p = pj.inject(params, cfg, key=jax.random.key(0))
    assert pj.targeted_modules(p) == ["bert.embeddings.word_embeddings", "classifier"]
    ids = jnp.asarray(io["input_ids"], jnp.int32)
    mask = jnp.asarray(io["attention_mask"], jnp.int32)
    tt = jnp.asarray(io["token_type_ids"], jnp.int32)
    y = jnp.asarray(io["labels"], jnp.int32)
    fwd = pj.apply(lambda q, b: model(**b, params=q).logits)

    def loss_fn(t, f):
        q = pj.combine(t, f)
        out = fwd(q, pj.prompt_inputs(q, ids, mask, token_type_ids=tt))
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    t, f = pj.partition(p)
    opt = optax.adam(5e-2)
    s = opt.init(t)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    l0 = float(loss_fn(t, f))
    for _ in range(8):
        _, g = grad(t, f)
        u, s = opt.update(g, s, t)
        t = optax.apply_updates(t, u)
    assert float(loss_fn(t, f)) < l0 - 0.1
    q = pj.combine(t, f)
    head = q["classifier"]["kernel"]
    assert not np.array_equal(head.arrays["default"]["weight"], params["classifier"]["kernel"])
    np.testing.assert_array_equal(head.base, params["classifier"]["kernel"])  # base untouched
    out = pj.save_pretrained(q, tmp_path)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(got) == sorted(load_file(str(FIX / case / "adapter_model.safetensors")))
    np.testing.assert_array_equal(
        got["base_model.classifier.weight"], head.arrays["default"]["weight"].T
    )


def test_prefix_and_adaption_bad_input_names_the_field():
    params, model = base_of(BASE), model_of(BASE)
    snap = snapshot(params)
    ids = jnp.array([[3, 4, 5]])
    T = dict(num_virtual_tokens=2)
    # the tree's own sizes are read (2 layers of 2 KV heads x 8); the KV head count cannot be,
    # and PEFT needs it in the file on grouped-query models
    with pytest.raises(pj.ConfigError, match="num_attention_heads.*grouped-query"):
        pj.inject(params, pj.PrefixTuningConfig(**T), key=0)
    T["num_attention_heads"] = 2
    px = pj.inject(params, pj.PrefixTuningConfig(**T), key=0)
    spec = px["model"]["embed_tokens"]["embedding"].spec("default")
    assert (spec.config.num_layers, spec.config.token_dim) == (2, 16)
    same = pj.PrefixTuningConfig.from_model_config(model.config, num_virtual_tokens=2)
    assert (same.num_layers, same.token_dim, same.num_attention_heads) == (2, 16, 2)
    for bad, field in ((dict(num_layers=3), "num_layers"), (dict(token_dim=8), "token_dim")):
        p = pj.inject(params, pj.PrefixTuningConfig(**T, **bad), key=0)
        with pytest.raises(pj.ShapeError, match=field):
            pj.prompt_inputs(p, ids, model=model)
    p = pj.inject(params, pj.PrefixTuningConfig(**{**T, "num_attention_heads": 4}), key=0)
    with pytest.raises(pj.ShapeError, match="num_attention_heads"):
        pj.prompt_inputs(p, ids, model=model)
    with pytest.raises(pj.ConfigError, match="model"):
        pj.prompt_inputs(px, ids)
    with pytest.raises(pj.UnsupportedModuleError, match="prefix_key_values"):
        pj.prompt_inputs(px, ids, model=lambda input_ids: input_ids)
    # adaption prompt: more layers than the model has; a model without Llama attention
    with pytest.raises(pj.ConfigError, match="adapter_layers"):
        pj.inject(params, pj.AdaptionPromptConfig(adapter_len=2, adapter_layers=3), key=0)
    for bad, field in (
        (dict(adapter_len=0, adapter_layers=1), "adapter_len"),
        (dict(adapter_len=2), "adapter_layers"),
    ):
        with pytest.raises(pj.ConfigError, match=field):
            pj.AdaptionPromptConfig(**bad)
    gpt2 = base_of("gpt2_prompt_tuning")
    with pytest.raises(pj.UnsupportedModuleError, match="q_proj"):
        pj.inject(
            gpt2,
            pj.AdaptionPromptConfig(target_modules="attn", adapter_len=2, adapter_layers=1),
            key=0,
        )
    # a function that never calls the attention as a linen module cannot get the prompt
    ad = pj.inject(params, pj.AdaptionPromptConfig(adapter_len=2, adapter_layers=1), key=0)
    with pytest.raises(pj.UnsupportedModuleError, match="model.layers.1.self_attn"):
        pj.apply(lambda p, x: x @ p["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"])(
            ad, jnp.ones((1, 32))
        )
    assert_unchanged(snap, params)


def test_virtual_token_lookup_never_copies_the_table():
    """Two row gathers and a select: no operation in the forward or its gradient makes an array
    the size of the embedding table (a real vocabulary's table is hundreds of MB)."""
    vocab, d = 1000, 8
    p = pj.inject(
        {"embed": {"embedding": jnp.ones((vocab, d))}},
        pj.PromptTuningConfig(num_virtual_tokens=4),
        key=0,
    )
    ids = pj.prompt_inputs(p, jnp.array([[3, 4, 999]]))["input_ids"]
    f = pj.apply(lambda q, i: jnp.take(q["embed"]["embedding"], i, axis=0).sum())
    t, fr = pj.partition(p)
    for fn in (lambda t: f(pj.combine(t, fr), ids), jax.grad(lambda t: f(pj.combine(t, fr), ids))):
        jaxpr = jax.make_jaxpr(fn)(t)

        def sizes(jx):
            for e in jx.eqns:
                for v in e.outvars:
                    yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
                for sub in jax.extend.core.jaxprs_in_params(e.params):
                    yield from sizes(sub)

        assert max(sizes(jaxpr.jaxpr)) < vocab * d


def test_adaption_prompt_on_a_linen_llama_style_model():
    """A linen attention with q/k/v/o projections and `adaption_queries` (peftjax's demo model):
    a fresh adapter (gate 0) is the base model; a trained one moves the outputs."""
    from peftjax.demo import Model

    model = Model(11)
    ids = jnp.array([[1, 2, 3, 4], [4, 3, 2, 1]])
    params = model.init(jax.random.key(0), ids)
    cfg = pj.AdaptionPromptConfig(adapter_len=3, adapter_layers=2)
    p = pj.inject(params, cfg, key=1)
    assert pj.targeted_modules(p) == [
        "model.layers_2.self_attn.q_proj",
        "model.layers_3.self_attn.q_proj",
    ]
    fwd = jax.jit(pj.apply(model.apply))
    base = model.apply(params, ids)
    np.testing.assert_allclose(fwd(p, ids), base, atol=1e-5)  # jit vs eager rounding
    t, f = pj.partition(p)
    loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(
        fwd(pj.combine(t, f), ids), ids
    ).mean()
    g = jax.grad(loss)(t)
    gates = [a["adaption_gate"] for a in _prompt_arrays(pj.combine(g, f)).values()]
    assert all(float(jnp.abs(x).sum()) > 0 for x in gates)  # the gate learns from step one
    moved = jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, t, g)
    assert float(jnp.abs(fwd(pj.combine(moved, f), ids) - base).max()) > 1e-3
