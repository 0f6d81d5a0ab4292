"""Adapter configs: frozen, hashable dataclasses with HF PEFT 0.21's field names and defaults.

Every config is immutable and hashable, so it can be a `jax.jit` static argument. List-valued
fields are stored as tuples and dict-valued fields (`rank_pattern`, `alpha_pattern`) as a
`FrozenDict`, which keeps insertion order (PEFT's pattern rule takes the *first* matching key).

Values are checked at construction and every error is a `ConfigError` (a `ValueError`) that names
the field and the value. Normalisations, all of which keep PEFT's meaning:

- `target_modules`, `exclude_modules`, `feedforward_modules` given as lists become *sorted,
  de-duplicated* tuples: PEFT turns them into sets, so their order never matters and two configs
  that differ only in that order are equal (one `jit` trace). `"all-linear"` is matched
  case-insensitively by PEFT and stored lower-case.
- Empty `exclude_modules`, `feedforward_modules`, `modules_to_save`, `layers_to_transform` and
  `layers_pattern` become `None` (PEFT treats an empty value as "not set").
- `target_modules=None` is accepted, as in PEFT, which fills it in from a table of model types when
  the adapter is injected. peftjax has no such table: injecting with `target_modules=None` raises.
  An empty `target_modules` list is rejected, except together with LoRA's `target_parameters`
  (as in PEFT), where it is kept as `()`.

PEFT fields that do not change the math are accepted by `from_dict` and dropped; `to_dict` writes
them back with PEFT's defaults so that PEFT loads the file. PEFT fields that do change the math and
that peftjax does not implement raise `ConfigError` whenever they hold a non-default value. Each
class lists both sets in `PEFT_IGNORED_FIELDS` and `PEFT_UNSUPPORTED_FIELDS` (name -> PEFT default).
Keys that PEFT 0.21 does not know at all are ignored, as PEFT ignores them.

`fan_in_fan_out` is accepted and has no effect on peftjax's math: it only tells PEFT that a torch
weight is stored `(in, out)` (GPT-2's `Conv1D`). Flax kernels are always `(in, out)`; the layout of
the torch file is the file-format module's business.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from peftjax.errors import ConfigError, PeftJaxError

__all__ = [
    "PEFT_FORMAT_VERSION",
    "AdapterConfig",
    "FrozenDict",
]

#: The HF PEFT release whose `adapter_config.json` layout `to_dict` reproduces (written as
#: `peft_version`; PEFT reads that field to pick backward-compatible behaviour).
PEFT_FORMAT_VERSION = "0.21.2"

#: PEFT's `TaskType` values (PEFT raises for any other non-None `task_type`).
TASK_TYPES = frozenset(
    {"SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"}
)

_V = TypeVar("_V")
_C = TypeVar("_C", bound="AdapterConfig")


class FrozenDict(Mapping[str, _V]):
    """An immutable, hashable mapping that keeps insertion order.

    Equality is order-sensitive (also against a plain `dict`), because the order of a
    `rank_pattern` decides which key wins; the hash agrees with that equality.

    >>> FrozenDict({"q_proj": 4, "v_proj": 8})["v_proj"]
    8
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[str, _V] | None = None) -> None:
        self._data: dict[str, _V] = dict(data) if data is not None else {}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(tuple(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self._data.items()) == list(other.items())

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (self._data,))


# ----------------------------------------------------------------------------- checks


def fail(name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"`{name}`={value!r}: {why}")


def unsupported(name: str, value: Any, default: Any) -> ConfigError:
    return fail(
        name,
        value,
        f"not supported by peftjax (it changes the adapter's math); use the default {default!r}.",
    )


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise fail(name, v, "must be True or False.")
    return v


def check_rank(name: str, v: Any) -> int:
    if not is_int(v) or v <= 0:
        raise fail(name, v, "the rank must be a positive integer.")
    return v


def check_alpha(name: str, v: Any) -> int | float:
    if not is_real(v):
        raise fail(name, v, "must be a finite number.")
    return v


def check_dropout(name: str, v: Any) -> int | float:
    if not is_real(v) or not 0 <= v < 1:
        raise fail(name, v, "a dropout probability must satisfy 0 <= p < 1.")
    return v


def check_opt_str(name: str, v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise fail(name, v, "must be a string or None.")
    return v


def str_seq(name: str, v: Any) -> tuple[str, ...]:
    """A list/tuple/set of strings as a tuple (order kept); a bare str is rejected."""
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple, set, frozenset)):
        raise fail(name, v, "must be a list of strings.")
    if not all(isinstance(x, str) for x in v):
        raise fail(name, v, "every entry must be a string.")
    return tuple(v)


def module_names(name: str, v: Any, *, empty_ok: bool) -> str | tuple[str, ...] | None:
    """`target_modules`-like: None, a regex str, or a list of names (-> sorted unique tuple)."""
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise fail(name, v, "an empty regex matches no module; give a pattern or a list.")
        return "all-linear" if v.lower() == "all-linear" else v
    names = tuple(sorted(set(str_seq(name, v))))
    if not names:
        if empty_ok:
            return None
        raise fail(name, v, "an empty list targets nothing; give module names or a regex.")
    return names


def check_regex(name: str, pattern: str, wrapped: str | None = None) -> None:
    """``pattern`` must compile as the regex PEFT builds from it (``wrapped`` with ``{}`` for
    the pattern, e.g. a ``rank_pattern`` key is used in ``(.*\\.)?({})$``)."""
    try:
        re.compile(pattern if wrapped is None else wrapped.replace("{}", pattern))
    except (re.error, RecursionError, OverflowError) as err:
        raise fail(name, pattern, f"not a valid regex: {err}.") from None


def regex_field(name: str, v: Any) -> Any:
    if isinstance(v, str) and v != "all-linear":
        check_regex(name, v)
    return v


def modules_to_save_field(v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    names = str_seq("modules_to_save", v)
    return names or None


def layers_to_transform_field(v: Any) -> int | tuple[int, ...] | None:
    if v is None:
        return None
    if is_int(v):
        if v < 0:
            raise fail("layers_to_transform", v, "layer indices are non-negative.")
        return v
    if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple, set, frozenset)):
        raise fail("layers_to_transform", v, "must be an int or a list of ints.")
    if not all(is_int(i) and i >= 0 for i in v):
        raise fail("layers_to_transform", v, "every entry must be a non-negative int.")
    return tuple(sorted(set(v))) or None


def layers_pattern_field(v: Any) -> str | tuple[str, ...] | None:
    out: str | tuple[str, ...] | None
    if v is None or isinstance(v, str):
        out = v or None
    else:
        out = str_seq("layers_pattern", v) or None
    for p in (out,) if isinstance(out, str) else out or ():
        check_regex("layers_pattern", p, r"(?:^|.*?\.){}\.(\d+)\.")
    return out


def pattern_field(name: str, v: Any, check: Any) -> FrozenDict:
    if v is None:
        return FrozenDict()
    if not isinstance(v, Mapping):
        raise fail(name, v, "must be a dict from module-name pattern to value.")
    for key, val in v.items():
        if not isinstance(key, str) or not key:
            raise fail(name, v, f"key {key!r} must be a non-empty string.")
        check_regex(f"{name} key", key, r"(.*\.)?({})$")
        check(f"{name}[{key!r}]", val)
    return v if isinstance(v, FrozenDict) else FrozenDict(v)


def jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return sorted(jsonable(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


# ----------------------------------------------------------------------------- base


#: The one description of each config field that several method configs share, by field name
#: (``"<field>:prompt"``: the prompt-learning configs' variant). A config docstring's
#: ``Attributes`` entry ``<field>: (shared)`` (or ``(shared: prompt)``) is replaced by it when
#: the class is made (`AdapterConfig.__init_subclass__`), so `help`, autodoc and the docs
#: show the full text and the text is written once.
FIELD_DOCS: Mapping[str, str] = FrozenDict(
    {
        "task_type": (
            'PEFT\'s ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"SEQ_2_SEQ_LM"``, '
            '``"TOKEN_CLS"``, ``"QUESTION_ANS"``, ``"FEATURE_EXTRACTION"``) or ``None``; '
            "metadata, written to ``adapter_config.json``."
        ),
        "task_type:prompt": (
            'PEFT\'s ``task_type``: ``None``, ``"CAUSAL_LM"``, ``"FEATURE_EXTRACTION"``, '
            '``"TOKEN_CLS"`` or ``"SEQ_CLS"`` (which adds PEFT\'s classifier heads ``classifier`` '
            "and ``score`` to ``modules_to_save``, so the head trains with the prompt)."
        ),
        "base_model_name_or_path": (
            "the base model's name or path; metadata, written to the file."
        ),
        "revision": ("the base model's revision; metadata, written to the file."),
        "inference_mode": (
            "``True``: `inject` adds the adapter frozen (not trainable, see `pj.set_trainable`). "
            "`save_pretrained` always writes ``true``, as PEFT does."
        ),
        "target_modules": (
            'the modules to adapt: a regex (full match of the module path), ``"all-linear"``, or '
            "a list of module names / dotted suffixes (stored sorted and de-duplicated). ``None`` "
            "is accepted, as in PEFT, but `inject` then raises: peftjax has no per-model default "
            "targets."
        ),
        "target_modules:prompt": (
            "not a PEFT field of prompt-learning configs: the word embedding module, when the "
            "tree's is not found by name (written to the file only when set)."
        ),
        "exclude_modules": (
            "modules never adapted: a regex (full match) or a list of names / dotted suffixes; "
            "``None`` (or empty): none."
        ),
        "exclude_modules:prompt": ("not used by prompt learning; leave it ``None``."),
        "modules_to_save": (
            "modules (names matched as PEFT matches them) whose whole weights get a trainable "
            "copy, saved with the adapter (e.g. a classifier head); ``None`` (or empty): none."
        ),
        "fan_in_fan_out": (
            "accepted, with no effect on peftjax's math: Flax kernels are always ``(in, out)`` "
            "(it tells PEFT that a torch weight is stored ``(in, out)``, e.g. GPT-2's "
            "``Conv1D``)."
        ),
        "layers_to_transform": (
            "adapt only these layer indices (an int or a list), read from the module path "
            "(``...layers.<i>...``) or, for a stacked weight, its layer axis; ``None``: every "
            "layer."
        ),
        "layers_pattern": (
            "with ``layers_to_transform``: the name (or names) of the layer list whose index is "
            'read (e.g. ``"layers"``, ``"h"``); ``None``: PEFT\'s default rule.'
        ),
        "num_virtual_tokens": ("the number of virtual tokens (required, > 0)."),
        "num_transformer_submodules": (
            "PEFT's count of transformer stacks (2 for encoder-decoder models): only ``None`` or "
            "``1`` (decoder-only and encoder-only models)."
        ),
        "token_dim": (
            "the model's hidden size (the word embedding's width); ``None``: read from the word "
            "embedding (a given one must match it)."
        ),
        "num_attention_heads": (
            "the model's number of attention heads; metadata except for prefix tuning."
        ),
        "num_layers": ("the model's number of layers; metadata except for prefix tuning."),
        "rank_pattern": (
            "``{module regex: rank}`` overriding ``r`` for the modules it matches (the first "
            "matching key wins)."
        ),
        "r:lycoris": ("the rank of the factors (``rank_pattern`` overrides it per module)."),
        "alpha:lycoris": ("the scale's numerator: ``scaling = alpha / r``."),
        "rank_dropout": ("dropout probability on the rank dimension while training."),
        "module_dropout:lycoris": (
            "probability of dropping a module's whole adapter in a training step."
        ),
        "use_effective_conv2d": (
            "for conv kernels larger than 1x1, PEFT's parameter-effective decomposition "
            "(FedPara's Proposition 3)."
        ),
        "alpha_pattern:lycoris": ("``{module regex: alpha}`` overriding ``alpha`` likewise."),
        "prompt_tuning_init_text": (
            'the init text of ``"TEXT"`` (required with it, as in PEFT; peftjax tokenizes nothing).'
        ),
        "tokenizer_name_or_path": (
            'the tokenizer of ``"TEXT"`` (required with it, as in PEFT); metadata.'
        ),
        "tokenizer_kwargs": (
            'keyword arguments of PEFT\'s tokenizer (only with ``"TEXT"``); metadata.'
        ),
        "prompt_tuning_init_ids": (
            "peftjax only (no PEFT name): the token ids of ``prompt_tuning_init_text`` for "
            '``"TEXT"`` init, at most ``num_virtual_tokens`` of them. Init-time only: not written '
            "to files (PEFT keeps only the text) and not part of the config's equality."
        ),
    }
)

_SHARED = re.compile(r"^(\s*)(\w+): \(shared(?:: (\w+))?\)$", re.M)
_SHARED_GROUP = re.compile(r"^(\s*)\(shared: common( prompt)?\)$", re.M)
#: the fields `AdapterConfig` gives every config, in its order (``(shared: common)``)
_COMMON = (
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
)
_PROMPT_VARIANT = ("task_type", "target_modules", "exclude_modules")


def _expand_field_docs(doc: str | None, where: str) -> str | None:
    """``doc`` with each ``<field>: (shared)`` entry replaced by `FIELD_DOCS`' text, wrapped
    under the entry (continuation lines two spaces deeper)."""
    if not doc or "(shared" not in doc:
        return doc

    def group(m: re.Match) -> str:  # `(shared: common [prompt])`: one entry per common field
        prompt = m.group(2) is not None
        return "\n".join(
            f"{m.group(1)}{f}: (shared{': prompt' if prompt and f in _PROMPT_VARIANT else ''})"
            for f in _COMMON
        )

    def entry(m: re.Match) -> str:
        indent, field, variant = m.group(1), m.group(2), m.group(3)
        key = f"{field}:{variant}" if variant else field
        if key not in FIELD_DOCS:
            raise KeyError(f"{where}: no shared description {key!r} in config.FIELD_DOCS")
        body = textwrap.wrap(
            f"{field}: {FIELD_DOCS[key]}",
            92 - len(indent),
            break_long_words=False,
            break_on_hyphens=False,
        )
        return "\n".join([indent + body[0]] + [indent + "  " + b for b in body[1:]])

    return _SHARED.sub(entry, _SHARED_GROUP.sub(group, doc))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every PEFT config has. Not used directly: use one of the method configs.

    A subclass's docstring may give a field as ``<field>: (shared)``: its text is then
    `FIELD_DOCS`' (filled in when the class is made); a line ``(shared: common)`` (or
    ``(shared: common prompt)``, the prompt-learning variant) stands for the seven fields above
    (``task_type`` ... ``modules_to_save``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = _expand_field_docs(cls.__doc__, cls.__name__)

    peft_type: ClassVar[str] = ""
    method: ClassVar[str] = ""
    #: how many trainable adapters of this method one tree may hold (``None``: any); `inject`
    #: refuses one more (PEFT's AdaLoRA trains one adapter at a time)
    max_trainable: ClassVar[int | None] = None
    #: PEFT fields accepted by `from_dict` and dropped (they do not change the math), with the
    #: value `to_dict` writes for them.
    PEFT_IGNORED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict(
        {"auto_mapping": None, "peft_version": PEFT_FORMAT_VERSION}
    )
    #: PEFT fields that change the math and that peftjax does not implement, with PEFT's default:
    #: any other value raises `ConfigError` (in `from_dict`; `to_dict` writes the default).
    PEFT_UNSUPPORTED_FIELDS: ClassVar[Mapping[str, Any]] = FrozenDict()
    #: Fields holding LoRA-style ``{module regex: value}`` patterns whose keys `inject` checks
    #: against the targeted modules (a method whose pattern fields mean something else, e.g.
    #: AdaLoRA's ``rank_pattern`` masks, lists fewer and checks its own).
    PATTERN_FIELDS: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")
    #: a prompt-learning method's route (`peftjax.methods.prompt`: ``"tokens"``, ``"prefix"``,
    #: ``"attention"``); ``None`` for methods that adapt weights. Its files are the spec's.
    route: ClassVar[str | None] = None

    # PEFT's `PeftConfig` fields (metadata only).
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # Module selection, common to every method.
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if not type(self).peft_type:
            raise TypeError(f"{type(self).__name__} is abstract; use LoraConfig, LoHaConfig, ...")
        task = self.task_type
        if task is not None and not (isinstance(task, str) and task in TASK_TYPES):
            raise fail("task_type", self.task_type, f"must be None or one of {sorted(TASK_TYPES)}.")
        check_opt_str("base_model_name_or_path", self.base_model_name_or_path)
        check_opt_str("revision", self.revision)
        check_bool("inference_mode", self.inference_mode)
        self._set(
            "target_modules",
            regex_field(
                "target_modules",
                module_names("target_modules", self.target_modules, empty_ok=False),
            ),
        )
        self._set(
            "exclude_modules",
            regex_field(
                "exclude_modules",
                module_names("exclude_modules", self.exclude_modules, empty_ok=True),
            ),
        )
        self._set("modules_to_save", modules_to_save_field(self.modules_to_save))
        for m in self.modules_to_save or ():
            # PEFT matches each entry as a regex inside `(^|.*\.){m}($|\..*)`
            check_regex("modules_to_save", m, r"(^|.*\.){}($|\..*)")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_layers(self, *, str_targets_forbidden: bool) -> None:
        """Normalise and check `layers_to_transform` / `layers_pattern` (LoRA, LoHa, LoKr)."""
        cfg: Any = self  # the layer fields are the subclass's (LoRA, LoHa, LoKr)
        given = cfg.layers_to_transform is not None
        self._set("layers_to_transform", layers_to_transform_field(cfg.layers_to_transform))
        self._set("layers_pattern", layers_pattern_field(cfg.layers_pattern))
        if given and cfg.layers_to_transform is None:
            # PEFT: an empty `layers_to_transform` means every layer; `layers_pattern` is moot.
            self._set("layers_pattern", None)
        if str_targets_forbidden and isinstance(self.target_modules, str):
            for name in ("layers_to_transform", "layers_pattern"):
                if getattr(self, name) is not None:
                    raise fail(
                        name,
                        getattr(self, name),
                        f"cannot be used when `target_modules` is a str "
                        f"({self.target_modules!r}); give `target_modules` as a list.",
                    )
        if cfg.layers_pattern is not None and cfg.layers_to_transform is None:
            raise fail(
                "layers_pattern",
                cfg.layers_pattern,
                "needs `layers_to_transform` to be set as well.",
            )

    # ------------------------------------------------------------------ method hooks
    # What generic code (inject, save, load, inspect) asks a config; each method's module
    # (`peftjax.methods.<method>`) overrides the hooks that apply to it.

    def plan_targets(self, groups: Mapping[str, list], layouts: Any) -> list | None:
        """The `_plan.Planned` leaves of a method that picks them itself rather than by
        ``target_modules`` (prompt learning: the word embedding), or ``None`` (the default:
        PEFT's ``target_modules`` rules)."""
        return None

    def rank_alpha(self, path: str) -> tuple[int, int | float] | None:
        """``(r, alpha)`` of module ``path`` (``rank_pattern`` / ``alpha_pattern`` applied) for
        methods whose delta is scaled by `scaling(r, alpha)`; ``None`` for the others."""
        return None

    #: the name of the field that holds the scale's ``alpha`` (methods with `rank_alpha` only)
    alpha_field: ClassVar[str] = "alpha"

    def scaling(self, r: int, alpha: float) -> float:
        """The method's scale for rank ``r`` and ``alpha`` (methods with `rank_alpha` only)."""
        raise NotImplementedError(f"{type(self).__name__} has no rank/alpha scaling")

    def module_spec(self, path: str, layout: Any, shape: tuple[int, ...], mask: Any) -> Any:
        """The static `Spec` of this method's adapter on the weight of module ``path``.

        ``mask``: for a stacked weight with ``layers_to_transform``, one bool per layer slice
        (``None``: every slice)."""
        raise NotImplementedError(f"{type(self).__name__} builds no module spec")

    def parameter_spec(self, param: str, nest: int, layout: Any, shape: tuple[int, ...]) -> Any:
        """The `Spec` of this method's adapter on a parameter targeted by PEFT's
        ``target_parameters`` (``param``: its PEFT parameter path, ``nest``: how many other
        targeted parameters of its module PEFT wraps around it), for methods that have them."""
        raise ConfigError(f"{type(self).__name__} has no `target_parameters`.")

    def module_specs(self, items: list[tuple[str, Any, tuple[int, ...], Any]]) -> list[Any]:
        """The specs of every module an injection adapts, ``items`` = ``[(path, layout, shape,
        mask)]`` in tree order. One `module_spec` per module unless the method plans them
        together (VeRA sizes its shared projections for every module)."""
        out = []
        for path, layout, shape, mask in items:
            try:
                out.append(self.module_spec(path, layout, shape, mask))
            except PeftJaxError as err:  # a spec's own shape check: name the module
                if f"`{path}`" in str(err):
                    raise
                raise type(err)(f"module `{path}`: {err}") from None
        return out

    def module_specs_beside(
        self,
        items: list[tuple[str, Any, tuple[int, ...], Any]],
        existing: Mapping[str, list[tuple[str, Any]]],
    ) -> list[Any]:
        """`module_specs` for an injection into a tree that may already hold adapters:
        ``existing`` = ``{adapter name: [(module path, spec)]}`` of every adapter in it (its
        modules in tree order). `inject` calls this; the default ignores ``existing``. A method
        whose later adapters depend on earlier ones overrides it (VeRA: PEFT shares the first
        adapter's projections with every later one)."""
        return self.module_specs(items)

    @property
    def method_label(self) -> str:
        """The method's name as a summary shows it (a variant may name itself, e.g. DoRA)."""
        return self.method

    def check_module(self, peft_path: str, spec: Any) -> None:
        """Raise `ConfigError` when this config, given to `save_pretrained`, would describe the
        module's adapter ``spec`` differently from what it is (beyond targets, r and alpha)."""

    def narrowed_fields(self, peft_paths: Mapping[str, Any]) -> dict[str, Any]:
        """Fields `load_pretrained` replaces when it narrows the file's config to exactly the
        modules present (``{module path: [PEFT paths]}``), beyond targets, ranks and alphas."""
        return {}

    @classmethod
    def from_specs(cls: type[_C], entries: list, common: dict[str, Any]) -> _C:
        """The config `save_pretrained` writes for an adapter whose modules are ``entries``
        (``peft_path``, ``layer``, ``spec``); ``common`` holds the targets and copies."""
        raise NotImplementedError(f"{cls.__name__} cannot be rebuilt from its specs")

    # ------------------------------------------------------------------ dict conversion

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """Builds the config from a parsed `adapter_config.json` (PEFT's or peftjax's).

        A `peft_type` key must name this class's type (any case). PEFT fields that do not change
        the math and keys unknown to PEFT are ignored; unsupported math-changing PEFT fields raise
        `ConfigError` when they hold a non-default value.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"expected a dict parsed from adapter_config.json, got {d!r}.")
        if cls is AdapterConfig:  # dispatch on `peft_type` through the method registry
            from .methods import config_from_dict

            return config_from_dict(d)  # type: ignore[return-value]
        peft_type = d.get("peft_type")
        if peft_type is not None and str(peft_type).upper() != cls.peft_type:
            raise fail(
                "peft_type",
                peft_type,
                f"{cls.__name__} reads only peft_type {cls.peft_type!r}; "
                f"use config_from_dict to dispatch on the type.",
            )
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in own:
                kwargs[key] = value
            elif key in cls.PEFT_UNSUPPORTED_FIELDS:
                default = cls.PEFT_UNSUPPORTED_FIELDS[key]
                if value != default:
                    raise unsupported(key, value, default)
            # else: PEFT_IGNORED_FIELDS, `peft_type`, `runtime_config` or unknown to PEFT: dropped
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Every field PEFT 0.21 writes to `adapter_config.json` for this config, JSON-ready.

        `json.dumps(cfg.to_dict(), indent=2, sort_keys=True)` is the file PEFT would write.
        """
        out: dict[str, Any] = {}
        out.update(jsonable(self.PEFT_IGNORED_FIELDS))
        out.update(jsonable(self.PEFT_UNSUPPORTED_FIELDS))
        for f in dataclasses.fields(self):
            out[f.name] = jsonable(getattr(self, f.name))
        out["peft_type"] = self.peft_type
        return out
