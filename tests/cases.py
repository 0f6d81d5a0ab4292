"""The one table of method cases that the suites share.

Each `Case` is ``(name, config, tree family, layouts, ...)``: a method (and variant) on a kind of
weight. `tests/test_invariants.py` runs every generic invariant over all of them; the forward,
file, checkpoint and CLI suites take the rows they need (`rows`, `file_rows`, `kind_rows`,
`spread`, at the bottom), all through one session cache of injected trees (`injected`).
`tests/test_conformance.py` fails when a registered method (`peftjax.methods.METHODS`) has no
case here, so adding a method means adding its rows (named ``<variant>-<kind>``).
"""

from __future__ import annotations

import dataclasses

import jax

import peftjax as pj
from peftjax.methods import METHODS
from tests.conftest import DENSE_GENERAL_LAYOUTS, STACKED_LAYOUT, TREES

# ------------------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: object
    tree: str
    layouts: object = None
    zero_init_exact: bool = True  # a fresh adapter merges to bit-identical weights
    stacked_layers: tuple[int, ...] | None = None  # layers_to_transform on a stacked tree

    def __str__(self):
        return self.name


def methods(targets, ff):
    """The method configs of the table, for given targets (ff: feedforward IA3 targets)."""
    L, H, K = pj.LoraConfig, pj.LoHaConfig, pj.LoKrConfig
    return {
        "lora": L(r=2, lora_alpha=4, target_modules=targets),
        "dora": L(r=2, lora_alpha=4, use_dora=True, target_modules=targets),
        "loha": H(r=2, alpha=4, target_modules=targets),
        # 16 -> (4, 4), 24 -> (4, 6), 8 -> (2, 4), conv channels 4 -> (2, 2), 8 -> (2, 4)
        "lokr_full": K(r=8, alpha=4, target_modules=targets),  # lokr_w1 and lokr_w2 full
        "lokr_decomposed": K(r=1, alpha=2, target_modules=targets),  # w2 = w2_b @ w2_a
        "lokr_decompose_both": K(r=1, alpha=2, decompose_both=True, target_modules=targets),
        "ia3_output": pj.IA3Config(target_modules=targets),
        "ia3_feedforward": pj.IA3Config(target_modules=ff, feedforward_modules=ff),
    }


KINDS = {
    # kind: (tree family, targets, feedforward targets, layouts). One or two modules each:
    # every distinct weight shape costs XLA compilations, and the table is long.
    "dense": ("llama", ["down_proj"], ["down_proj"], None),  # (24, 16): in != out
    "dense_general": ("dense_general", ["query", "out"], ["out"], DENSE_GENERAL_LAYOUTS),
    "conv": ("conv", ["conv1"], ["conv1"], None),
    "stacked": ("stacked", ["q_proj"], ["q_proj"], STACKED_LAYOUT),  # with a (3, 16) bias
    "mlp_bias": ("mlp", ["fc1", "fc2"], ["fc2"], None),
}


def _build_cases() -> list[Case]:
    cases = []
    for kind, (tree, targets, ff, layouts) in KINDS.items():
        for method, cfg in methods(targets, ff).items():
            if kind == "mlp_bias" and method != "ia3_output":
                continue  # the biased MLP is there for IA3's bias scaling
            exact = not getattr(cfg, "use_dora", False)
            cases.append(Case(f"{method}-{kind}", cfg, tree, layouts, exact))
    L = pj.LoraConfig
    dense = ["k_proj"]
    cases += [
        Case(
            "lora_rslora-dense",
            L(r=4, lora_alpha=8, use_rslora=True, target_modules=dense),
            "llama",
        ),
        Case(
            "lora_gaussian-dense",
            L(r=4, init_lora_weights="gaussian", target_modules=dense),
            "llama",
        ),
        Case(
            "lora-embed", L(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]), "llama"
        ),
        Case(
            "lora_gaussian-embed",
            L(r=2, init_lora_weights="gaussian", target_modules=["embed_tokens"]),
            "llama",
        ),
        Case(
            "dora-embed",
            L(r=2, use_dora=True, target_modules=["embed_tokens"]),
            "llama",
            zero_init_exact=False,
        ),
        Case(
            "ln_tuning-llama",
            pj.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
            "llama",
        ),
        Case(
            "ln_tuning-stacked",
            pj.LNTuningConfig(target_modules=["input_layernorm", "final_ln"]),
            "stacked",
            STACKED_LAYOUT,
        ),
        Case(
            "lora+modules_to_save-llama",
            L(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            "llama",
        ),
        Case(
            "loha+modules_to_save-conv",
            pj.LoHaConfig(r=2, target_modules=["conv1"], modules_to_save=["conv2"]),
            "conv",
        ),
    ]
    cases += [  # an nnx `State` (Variables, nnx.List indices)
        Case("lora_all_linear-nnx", L(r=2, target_modules="all-linear"), "nnx"),
        Case("ia3_output-nnx", pj.IA3Config(target_modules=["v_proj"]), "nnx"),  # with a bias
        Case("ln_tuning-nnx", pj.LNTuningConfig(target_modules=["norm"]), "nnx"),
    ]
    cases += [  # PEFT's Tucker conv forms (hada_t1/t2, lokr_t2)
        Case(
            "loha_effective_conv-conv",
            pj.LoHaConfig(r=2, alpha=4, use_effective_conv2d=True, target_modules=["conv1"]),
            "conv",
        ),
        Case(
            "lokr_effective_conv-conv",
            pj.LoKrConfig(r=1, alpha=2, use_effective_conv2d=True, target_modules=["conv1"]),
            "conv",
        ),
    ]
    stacked_t = ["down_proj"]
    for name, cfg in {
        "lora": L(r=2, target_modules=stacked_t, layers_to_transform=[0, 2]),
        "dora": L(r=2, use_dora=True, target_modules=stacked_t, layers_to_transform=[0, 2]),
        "loha": pj.LoHaConfig(r=2, target_modules=stacked_t, layers_to_transform=[0, 2]),
        "lokr": pj.LoKrConfig(r=1, target_modules=stacked_t, layers_to_transform=[0, 2]),
    }.items():
        exact = name != "dora"
        cases.append(
            Case(f"{name}-stacked-layers_0_2", cfg, "stacked", STACKED_LAYOUT, exact, (0, 2))
        )
    cases += _adalora_cases()
    cases += _vera_cases()
    cases += _oft_cases()
    return cases


def _adalora_cases() -> list[Case]:
    """AdaLoRA (Linear and Conv2d, as PEFT): init_r-sized modules on every kind of weight, and
    pruned ones (a `rank_pattern`, one module at rank 0: zero-size arrays)."""
    A = lambda targets, **kw: pj.AdaLoraConfig(  # noqa: E731
        init_r=3, target_r=1, lora_alpha=4, total_step=10, target_modules=targets, **kw
    )
    out = []
    for kind in ("dense", "dense_general", "conv", "stacked"):
        tree, targets, _, layouts = KINDS[kind]
        out.append(Case(f"adalora-{kind}", A(targets), tree, layouts))
    out.append(
        Case(
            "adalora-stacked-layers_0_2",
            A(["down_proj"], layers_to_transform=[0, 2]),
            "stacked",
            STACKED_LAYOUT,
            stacked_layers=(0, 2),
        )
    )
    pruned = {"fc1.lora_E": [True, False, True], "fc2.lora_E": [False, False, False]}
    out.append(Case("adalora_pruned-mlp", A(["fc1", "fc2"], rank_pattern=pruned), "mlp"))
    return out


def _vera_cases() -> list[Case]:
    """VeRA (dense only, as PEFT): one pair of shared projections per adapter, sized over
    every target, so the rows target modules of different shapes."""
    V = lambda targets, **kw: pj.VeraConfig(r=3, target_modules=targets, **kw)  # noqa: E731
    several = ["q_proj", "v_proj", "down_proj"]  # (16, 16), (16, 8), (24, 16)
    return [
        Case("vera-dense", V(["down_proj"]), "llama"),
        Case("vera-mlp_bias", V(["fc1", "fc2"]), "mlp"),  # (12, 20), (20, 12)
        Case("vera_several-llama", V(several), "llama"),
        Case("vera-dense_general", V(["query", "out"]), "dense_general", DENSE_GENERAL_LAYOUTS),
        Case("vera-stacked", V(["q_proj", "down_proj"]), "stacked", STACKED_LAYOUT),
        Case(
            "vera-stacked-layers_0_2",
            V(["down_proj"], layers_to_transform=[0, 2]),
            "stacked",
            STACKED_LAYOUT,
            stacked_layers=(0, 2),
        ),
    ]


def _oft_cases() -> list[Case]:
    """OFT (multiplicative: a block-diagonal rotation of the input features) on every kind of
    weight PEFT adapts with it (Linear, Conv2d, Embedding), stacked ones too, and its variants:
    exact Cayley, COFT, shared blocks, ``r`` instead of ``oft_block_size``. Block size 4 divides
    every rotated width here (dense 24 / 16 / 8, conv 4 * 3 * 3 = 36, embedding 16)."""
    O = lambda targets, **kw: pj.OFTConfig(  # noqa: E731
        oft_block_size=4, target_modules=targets, **kw
    )
    out = []
    for kind in ("dense", "dense_general", "conv", "stacked"):
        tree, targets, _, layouts = KINDS[kind]
        out.append(Case(f"oft-{kind}", O(targets), tree, layouts))  # Neumann, PEFT's default
    dense = ["down_proj"]
    out += [
        Case("oft_exact-dense", O(dense, use_cayley_neumann=False), "llama"),
        Case("oft_coft-dense", O(dense, coft=True, eps=0.5), "llama"),
        Case("oft_block_share-dense", O(dense, block_share=True, coft=True, eps=0.2), "llama"),
        Case("oft_r-dense", pj.OFTConfig(r=3, oft_block_size=0, target_modules=dense), "llama"),
        Case("oft-embed", O(["embed_tokens"]), "llama"),
        Case(
            "oft-stacked-layers_0_2",
            O(["down_proj"], layers_to_transform=[0, 2]),
            "stacked",
            STACKED_LAYOUT,
            True,
            (0, 2),
        ),
    ]
    return out


CASES = _build_cases()
BY_NAME = {c.name: c for c in CASES}
assert len(BY_NAME) == len(CASES)


def _prompt_cases() -> list[Case]:
    """The methods that act on activations (`peftjax.methods.prompt`), each variant on
    transformers' Flax Llama (tree ``flax_llama``: the prompt fixtures' tiny Llama, built by
    ``tests/test_prompt.py``): they need a real model, not the weight trees above, and they do
    not merge, so the generic weight invariants do not apply; ``tests/test_prompt.py`` runs the
    prompt invariants (purity, partition, training, files, checkpoints, mesh) over these rows."""
    T = dict(task_type="CAUSAL_LM", num_virtual_tokens=3)
    return [
        Case("prompt_tuning-random", pj.PromptTuningConfig(**T), "flax_llama"),
        Case(
            "prompt_tuning-text",
            pj.PromptTuningConfig(
                **T,
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text="Classify:",
                tokenizer_name_or_path="tiny-llama",
                prompt_tuning_init_ids=[5, 9],
            ),
            "flax_llama",
        ),
        Case("p_tuning-mlp", pj.PromptEncoderConfig(**T, encoder_hidden_size=16), "flax_llama"),
        Case(
            "p_tuning-lstm",
            pj.PromptEncoderConfig(
                **T,
                encoder_reparameterization_type="LSTM",
                encoder_hidden_size=8,
                encoder_num_layers=2,
                encoder_dropout=0.1,
            ),
            "flax_llama",
        ),
        # the tiny Llama has 2 KV heads for 4 query heads (the other sizes are read from the tree)
        Case(
            "prefix_tuning-plain", pj.PrefixTuningConfig(**T, num_attention_heads=2), "flax_llama"
        ),
        Case(
            "prefix_tuning-projection",
            pj.PrefixTuningConfig(
                **T, num_attention_heads=2, prefix_projection=True, encoder_hidden_size=16
            ),
            "flax_llama",
        ),
        Case(
            "multitask_prompt_tuning-3tasks",
            pj.MultitaskPromptTuningConfig(**T, num_tasks=3, num_ranks=2),
            "flax_llama",
        ),
        Case(
            "adaption_prompt-2layers",
            pj.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2),
            "flax_llama",
        ),
    ]


PROMPT_CASES = _prompt_cases()


def rows(*, method: str | None = None, tree: str | None = None) -> list[Case]:
    """The cases of one method (``config.method``) and / or one tree family."""
    return [
        c
        for c in CASES
        if (method is None or c.config.method == method) and (tree is None or c.tree == tree)
    ]


def has_peft_file(case: Case) -> bool:
    """Whether the case's method has a PEFT file format: PEFT key suffixes for its arrays
    (`Method.key_suffixes`) or whole-module copies (LN tuning)."""
    m = METHODS[case.config.method]
    return bool(m.key_suffixes or m.whole_modules)


def file_rows(*, method: str | None = None, tree: str | None = None) -> list[Case]:
    """`rows` whose method has a PEFT file format: the file and CLI round trips."""
    return [c for c in rows(method=method, tree=tree) if has_peft_file(c)]


def kind_rows(kind: str) -> list[Case]:
    """The rows of one weight kind, by the table's naming: ``<variant>-<kind>`` (``kind`` a key
    of `KINDS`, or ``embed``): one row per method variant on that kind of weight."""
    return [c for c in CASES if c.name.endswith(f"-{kind}")]


def retarget(config, targets):
    """``config`` on other modules: its ``target_modules`` and, when set, its
    ``feedforward_modules`` (IA3) become ``targets``; everything else is kept."""
    kw = {"target_modules": list(targets)}
    if getattr(config, "feedforward_modules", None):
        kw["feedforward_modules"] = list(targets)
    return dataclasses.replace(config, **kw)


def kind_of(case: Case) -> str:
    """The weight kind of a row, from its name ``<variant>-<kind>``: ``dense``, ``conv``,
    ``embed``, ``stacked-layers_0_2``, ... (the tree family for the ``<variant>-<tree>`` rows)."""
    return case.name.split("-", 1)[1]


def method_of(case: Case) -> str:
    return case.config.method


def tree_of(case: Case) -> str:
    return case.tree


def spread(cases: list[Case], keys=(method_of, tree_of, kind_of)) -> list[Case]:
    """A few of ``cases`` in which every value of every key still appears (by default every
    method, every tree family and every weight kind): the first row of each, in table order.
    For a suite where a run per row costs too much and the rows left out differ from a kept
    one only in what that suite does not look at."""
    picked = {c.name for key in keys for c in {key(c): c for c in reversed(cases)}.values()}
    return [c for c in cases if c.name in picked]


# ------------------------------------------------------------------------------ the shared cache

#: RBG keys: their random-bits programs compile several times faster than threefry's (one
#: compilation per distinct adapter shape); the suites sharing `injected` do not depend on the
#: initial values beyond "a fresh adapter" (most of them replace them with random ones).
KEY = jax.random.key(0, impl="unsafe_rbg")

_INJECTED: dict[str, tuple] = {}


def injected(case: Case):
    """``(p, inject(p))`` for a case, computed once per session (inject is pure), so that every
    suite taking rows from the table shares the compilations. The trees are shared: never
    mutate them (JAX arrays cannot be; numpy leaves must be copied first)."""
    if case.name not in _INJECTED:
        p = TREES[case.tree]()
        q = pj.inject(p, case.config, key=KEY, layouts=case.layouts)
        _INJECTED[case.name] = (p, q)
    return _INJECTED[case.name]
