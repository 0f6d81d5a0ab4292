"""Every public name has a Google-style docstring: functions say Args/Returns/Raises and show a
runnable ``>>>`` example (run by tests/test_docs.py's doctests); config classes document their
fields and show an example; exceptions say when they are raised."""

import inspect

import pytest

import peftjax as pj

NAMES = sorted(n for n in pj.__all__ if n != "METHODS")


def _kind(obj) -> str:
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return "error"
    if inspect.isclass(obj):
        return "class"
    return "function"


def _params(obj) -> list[str]:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p for p in sig.parameters if p not in ("self", "cls")]


@pytest.mark.parametrize("name", NAMES)
def test_public_docstring_is_complete(name):
    obj = getattr(pj, name)
    doc = inspect.getdoc(obj) or ""
    kind = _kind(obj)
    assert doc.strip(), f"pj.{name} has no docstring"
    if kind == "error":
        return
    missing = []
    if kind == "function":
        if _params(obj) and "Args:" not in doc:
            missing.append("Args:")
        for section in ("Returns:", "Raises:"):
            if section not in doc:
                missing.append(section)
    else:
        if "Attributes:" not in doc and "Args:" not in doc:
            missing.append("Attributes: or Args:")
    if ">>>" not in doc:
        missing.append(">>> example")
    assert not missing, f"pj.{name}'s docstring lacks {', '.join(missing)}"


@pytest.mark.parametrize("name", [n for n in NAMES if _kind(getattr(pj, n)) == "function"])
def test_documented_args_are_the_signature(name):
    """The Args section names every parameter (no stale or missing entries)."""
    obj = getattr(pj, name)
    doc = inspect.getdoc(obj) or ""
    if "Args:" not in doc:
        pytest.skip("no Args section (checked by test_public_docstring_is_complete)")
    section = doc.split("Args:", 1)[1]
    for end in ("Returns:", "Yields:", "Raises:", "Example", "Note"):
        section = section.split(f"\n{end}", 1)[0]
    lines = [line for line in section.splitlines() if line.strip()]
    indent = min((len(line) - len(line.lstrip()) for line in lines), default=0)
    documented = set()
    for line in lines:
        stripped = line.strip()
        if len(line) - len(line.lstrip()) == indent and ":" in stripped:
            documented.add(stripped.split(":", 1)[0].split(" (", 1)[0].lstrip("*"))
    params = set(_params(obj))
    assert params <= documented, f"pj.{name}: Args lacks {sorted(params - documented)}"
    assert documented <= params, f"pj.{name}: Args names {sorted(documented - params)}"


def test_shared_field_texts_are_filled_in():
    """``<field>: (shared)`` / ``(shared: common)`` entries become `config.FIELD_DOCS`' texts;
    an unknown one fails when the class is made."""
    from peftjax.config import FIELD_DOCS, AdapterConfig

    for name in NAMES:
        obj = getattr(pj, name)
        if inspect.isclass(obj) and issubclass(obj, AdapterConfig):
            doc = inspect.getdoc(obj)
            assert "(shared" not in doc, name
            assert "  revision: " + FIELD_DOCS["revision"] in " ".join(doc.split("\n    "))
    with pytest.raises(KeyError, match="no shared description 'nope'"):

        class Broken(AdapterConfig):
            """A config.

            Attributes:
              nope: (shared)
            """
