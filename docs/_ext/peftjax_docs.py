"""Sphinx helpers of peftjax's docs: the ``config-fields`` directive.

``config-fields`` renders the table of a config class's fields from the class itself (every
dataclass field, in order, with its default) and the meanings written in the directive's body,
one ``field: meaning`` line each (indented lines continue the meaning). Fields shared by every
config (``task_type``, ``target_modules``...) have a meaning here unless the body overrides it.
A field without a meaning, or a meaning for a name that is not a field, is a build warning (an
error under ``-W``), so the tables cannot drift from the code. Below the table it lists the PEFT
fields that the class accepts and drops (``PEFT_IGNORED_FIELDS``) and the ones it accepts only
at their default (``PEFT_UNSUPPORTED_FIELDS``).

Options: ``:peftjax-only: a, b`` names fields that PEFT's class lacks (every other field has
PEFT's name).
"""

from __future__ import annotations

import dataclasses
import importlib

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Meanings of the fields that many configs share (a page's own line wins).
COMMON = {
    "task_type": "PEFT's task type (`CAUSAL_LM`, `SEQ_CLS`, ...); saved in the file. For prompt "
    "methods it decides the inputs (`SEQ_CLS` also trains the classifier as `modules_to_save`).",
    "base_model_name_or_path": "the base model's name, saved in `adapter_config.json` only.",
    "revision": "the base model's revision, saved in the file only.",
    "inference_mode": "`True`: the adapter is frozen (`inject(..., trainable=None)` follows it; "
    "`load_pretrained(..., is_trainable=False)` sets it).",
    "target_modules": "the modules to adapt: a regex (full match on the module path), a list of "
    'names or `.`-suffixes, or `"all-linear"`; PEFT\'s matching rules.',
    "exclude_modules": "modules never adapted: a regex (full match) or a list of names / "
    "`.`-suffixes.",
    "modules_to_save": "modules trained in full beside the adapter: one trainable copy per adapter "
    "(PEFT's `endswith` rule); see {doc}`/methods/modules_to_save`.",
    "layers_to_transform": "layer indices to adapt (an int or a list), read from the module path "
    "(`...layers.3...`), or the slices of a stacked (scanned) weight.",
    "layers_pattern": "the name(s) of the layer list in the path when `layers_to_transform` is set "
    '(e.g. `"layers"`, `"h"`).',
    "rank_pattern": "`{pattern: rank}` overrides of `r` per module (the first key whose "
    "`(.*\\.)?(key)$` matches wins, PEFT's rule).",
    "alpha_pattern": "`{pattern: alpha}` overrides of the alpha per module, same rule.",
    "fan_in_fan_out": "accepted and saved; tells PEFT the torch weight is stored `(in, out)` "
    "(GPT-2's `Conv1D`). Flax kernels are always `(in, out)`, so peftjax's math ignores it.",
    "num_virtual_tokens": "`T`, the number of virtual tokens (required).",
    "token_dim": "`D`, the width of a virtual token (default: the embedding table's width).",
    "num_transformer_submodules": "1 for decoder-only and encoder-only models, 2 for "
    "encoder-decoder (PEFT's rule); rows are `T * num_transformer_submodules`.",
    "num_attention_heads": "the model's attention heads (prefix tuning's KV heads after GQA).",
    "num_layers": "the model's transformer layers.",
}


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if hasattr(value, "items"):
            value = dict(value)
    else:
        return "(required)"
    return repr(value)


def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.replace(",", " ").split() if n.strip()]


class ConfigFields(SphinxDirective):
    """``config-fields`` directive (see the module docstring)."""

    required_arguments = 1
    has_content = True
    option_spec = {"peftjax-only": directives.unchanged}

    def _cls(self):
        path = self.arguments[0]
        mod, _, name = path.rpartition(".")
        return getattr(importlib.import_module(mod), name)

    def _meanings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        last = None
        for line in self.content:
            if not line.strip():
                continue
            if line[:1].isspace() and last is not None:
                out[last] += " " + line.strip()
                continue
            name, sep, text = line.partition(":")
            if not sep:
                logger.warning(
                    f"config-fields: expected `field: meaning`, got {line!r}",
                    location=self.get_location(),
                )
                continue
            last = name.strip()
            out[last] = text.strip()
        return out

    def _inline(self, text: str) -> nodes.paragraph:
        para = nodes.paragraph()
        parsed, messages = self.state.inline_text(text, self.lineno)
        para += parsed
        para += messages
        return para

    def run(self) -> list[nodes.Node]:
        cls = self._cls()
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        own = self._meanings()
        only = set(_split_names(self.options.get("peftjax-only", "")))
        for extra in sorted((set(own) | only) - set(names)):
            logger.warning(
                f"config-fields: {extra!r} is not a field of {cls.__name__}",
                location=self.get_location(),
            )

        table = nodes.table(classes=["config-fields"])
        group = nodes.tgroup(cols=4)
        table += group
        for width in (22, 22, 14, 42):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        row = nodes.row()
        for title in ("peftjax field", "PEFT's name", "default", "meaning"):
            row += nodes.entry("", nodes.paragraph(text=title))
        head += row
        body = nodes.tbody()
        group += body
        for f in fields:
            meaning = own.get(f.name, COMMON.get(f.name))
            if meaning is None:
                logger.warning(
                    f"config-fields: no meaning for field {f.name!r} of {cls.__name__}",
                    location=self.get_location(),
                )
                meaning = ""
            peft = "(none: peftjax only)" if f.name in only else "same"
            row = nodes.row()
            row += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=f.name)))
            row += nodes.entry("", nodes.paragraph(text=peft))
            row += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=_default(f))))
            row += nodes.entry("", self._inline(meaning))
            body += row

        out: list[nodes.Node] = [table]
        for attr, what in (
            (
                "PEFT_IGNORED_FIELDS",
                "PEFT fields that `from_dict` accepts and drops (they do not change the math; "
                "`to_dict` writes them back with PEFT's defaults)",
            ),
            (
                "PEFT_UNSUPPORTED_FIELDS",
                "PEFT fields that change the math and that peftjax does not implement: accepted "
                "only at PEFT's default, any other value is a `ConfigError`",
            ),
        ):
            extra = list(getattr(cls, attr, {}) or {})
            if extra:
                para = nodes.paragraph()
                para += self._inline(what + ": ").children
                for i, name in enumerate(extra):
                    if i:
                        para += nodes.Text(", ")
                    para += nodes.literal(text=name)
                para += nodes.Text(".")
                out.append(para)
        return out


def setup(app):
    app.add_directive("config-fields", ConfigFields)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
