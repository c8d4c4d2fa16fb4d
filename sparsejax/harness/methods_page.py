"""The method reference page, docs/methods.md, generated from the registry and the code.

Everything on the page is read from the code: each registered builder
(:data:`sparsejax.METHODS`) gives its docstring without the examples, its options and
defaults (:func:`inspect.signature`, less the optimizer), each option's first sentence
in its ``Args:`` section where it has one, and the papers that its docstring, or the item
of its module's docstring that names it, cites ("Evci et al. 2020", "A & B 2019"); the
recipes come from :data:`sparsejax.harness.training.recipes.RECIPES`. Methods are grouped by the
module that builds them (one family each), in registration order, by name within one.
After changing a builder, its docstring or a recipe, regenerate the page (the test
``tests/test_methods_reference.py`` fails until then)::

    python -m sparsejax.harness.methods_page docs/methods.md

>>> page = render_methods()
>>> "### rigl" in page and "Evci et al. 2020" in page
True
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

REGENERATE = "python -m sparsejax.harness.methods_page docs/methods.md"
_CITATION = re.compile(
    r"\b([A-Z][A-Za-z'-]+(?:\s+et\s+al\.|\s+&\s+[A-Z][A-Za-z'-]+)),?\s+((?:19|20)\d\d)\b")
_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr):`(~?)([^`]+)`")
_ARG = re.compile(r"^  ([A-Za-z_][\w, ]*): ?(.*)$")


def markdown(text: str) -> str:
    """reStructuredText roles and literals as markdown code spans.

    >>> markdown("see :func:`~sparsejax.topk_mask` and ``k``")
    'see `topk_mask` and `k`'
    """
    text = _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def arg_descriptions(doc: str) -> dict[str, str]:
    """``{option: first sentence}`` from the ``Args:`` section of a Google-style docstring.

    >>> arg_descriptions("Do it.\\n\\nArgs:\\n  a, b: two things. More.\\n  c: one\\n    more.")
    {'a': 'two things.', 'b': 'two things.', 'c': 'one more.'}
    """
    entries: dict[str, list[str]] = {}
    names: list[str] = []
    inside = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            inside = True
        elif inside and (not line.strip() or not line.startswith("  ")):
            inside = False
        elif inside and (match := _ARG.match(line)):
            names = [name.strip() for name in match[1].split(",")]
            for name in names:
                entries[name] = [match[2]]
        elif inside:
            for name in names:
                entries[name].append(line.strip())
    # the first sentence: up to a full stop before a capital letter or a code span
    first = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s+(?=[A-Z`])")
    return {name: markdown(first.split(" ".join(words).strip(), maxsplit=1)[0])
            for name, words in entries.items()}


def citations(builder: Callable[..., Any]) -> list[str]:
    """The papers the code names for ``builder``: "Author et al. YYYY" or "A & B YYYY" in
    its docstring, else in the items of its module's docstring that name it."""
    found = _CITATION.findall(inspect.getdoc(builder) or "")
    if not found:
        module_doc = sys.modules[builder.__module__].__doc__ or ""
        for item in re.split(r"\n\s*\n|\n(?=\* )", module_doc):
            if f":func:`{builder.__name__}`" in item:
                found += _CITATION.findall(item)
    return list(dict.fromkeys(f"{' '.join(who.split())} {year}" for who, year in found))


def default_text(value: Any) -> str:
    """A signature default as the page shows it (functions by name, not address)."""
    if inspect.isfunction(value) or inspect.isbuiltin(value):
        return value.__name__
    return repr(value)


def family_title(module_name: str) -> str:
    """A module's docstring up to its first colon, full stop or parenthesis, on one line."""
    doc = " ".join((sys.modules[module_name].__doc__ or module_name).split())
    return re.split(r":\s|\.\s|\.$|\s\(", doc, maxsplit=1)[0]


def flag_value(value: Any) -> str:
    """A value as ``--method-option``/``--model-option`` parse it (JSON, else a string)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def render_recipes(name: str) -> list[str]:
    """Markdown lines for the recipes of method ``name`` (none: no lines)."""
    from sparsejax.harness.training.recipes import MODEL_FAMILIES, RECIPES

    lines: list[str] = []
    for recipe in RECIPES.values():
        method, family = recipe.name.split("/")
        if method != name:
            continue
        models = ", ".join(f"`{m}`" for m, f in MODEL_FAMILIES.items() if f == family)
        flags = [f"--{key.replace('_', '-')} {value}" for key, value in recipe.training.items()]
        flags += [f"--model-option {k}={flag_value(v)}" for k, v in recipe.model_options.items()]
        flags += [f"--method-option {k}={flag_value(v)}"
                  for k, v in recipe.method_options.items()]
        only = "".join(f"; `{k}` only with `--sparsity`" for k in recipe.with_sparsity_only)
        lines.append(f"- `{recipe.name}` (models {models}): `{' '.join(flags)}`{only}. "
                     f"From {recipe.source}.")
    if lines:
        lines.insert(0, "Recipes (`sparsejax train --method "
                     f"{name} --model ...` applies the one of the model's family):")
    return lines


def render_method(name: str, builder: Callable[..., Any]) -> list[str]:
    """Markdown lines for one registered method."""
    doc = inspect.getdoc(builder) or ""
    prose = [markdown(p) for p in re.split(r"\n\s*\n", doc.strip())  # examples, Args: out
             if p and not p.startswith((">>>", "Args:"))]
    lines = [f"### {name}", "", f"`{builder.__module__}.{builder.__name__}`: "
             + (prose[0] if prose else "(no docstring)"), ""]
    for paragraph in prose[1:]:
        lines += [paragraph, ""]
    papers = citations(builder)
    if papers:
        lines += [f"Paper{'s' if len(papers) > 1 else ''}: {'; '.join(papers)}.", ""]
    described = arg_descriptions(doc)
    options = list(inspect.signature(builder).parameters.values())[1:]  # not the optimizer
    lines += ["Options:" if options else "Options: none.", ""]
    for option in options:
        default = ("required" if option.default is inspect.Parameter.empty
                   else f"default `{default_text(option.default)}`")
        about = f": {described[option.name]}" if option.name in described else ""
        lines.append(f"- `{option.name}` ({default}){about}")
    if options:
        lines.append("")
    recipes = render_recipes(name)
    return lines + (recipes + [""] if recipes else [])


def render_methods(methods: Mapping[str, Callable[..., Any]] | None = None) -> str:
    """The markdown of docs/methods.md for ``methods`` (default: every method registered by
    sparsejax itself; builders defined outside the package are left out)."""
    if methods is None:
        from sparsejax.methods import METHODS

        methods = METHODS
    shipped = {n: b for n, b in methods.items() if b.__module__.startswith("sparsejax.")}
    families: dict[str, list[str]] = {}
    for name, builder in shipped.items():
        families.setdefault(builder.__module__, []).append(name)
    lines = [
        "# Methods",
        "",
        "<!-- Generated by sparsejax/harness/methods_page.py from the code; do not edit. -->",
        f"Generated from the code; regenerate with `{REGENERATE}` "
        "(`tests/test_methods_reference.py` fails while this page and the code differ).",
        "",
        "Every method is built as `sparsejax.get_method(name, optimizer, **options)`; in a "
        "loop of your own the methods that train weights are also "
        "`sparsejax.sparse_tx(name, optimizer, **options)` (docs/own_loop.md). On the command line "
        "`sparsity` and `distribution` are `--sparsity` and `--distribution`, "
        "`total_steps`, `batches_per_epoch` and `apply_fn` come from the run, `prunable` "
        "is a Python filter function, and every other option is `--method-option "
        "KEY=VALUE` (a JSON value, else a string). An option's description is the first "
        "sentence of its entry in the builder's `Args:` section, where it has one "
        "(`help(builder)` shows all of it). Options not given take the method's "
        "recipe for the model's family, where one is recorded (`--recipe none`: library "
        "defaults).",
        "",
        "| method | family | papers named in the code |",
        "| --- | --- | --- |",
    ]
    for module, names in families.items():
        for name in sorted(names):
            papers = "; ".join(citations(shipped[name])) or "-"
            lines.append(f"| [{name}](#{name}) | {family_title(module)} | {papers} |")
    lines.append("")
    for module, names in families.items():
        lines += [f"## {family_title(module)} (`{module}`)", ""]
        for name in sorted(names):
            lines += render_method(name, shipped[name])
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m sparsejax.harness.methods_page [PATH]``: write the page to PATH, else print
    it."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(render_methods())
        return
    with open(args[0], "w", encoding="utf-8") as out:
        out.write(render_methods())


if __name__ == "__main__":
    main()
