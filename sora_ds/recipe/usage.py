"""``--help`` of the recipe scripts, generated from the config dataclasses: every key, its default (the entry
script's YAML value where it sets one) and one line of help, taken from the field's trailing comment or, for the
library configs, from their docstring's ``Attributes:`` entries. Nothing is written twice."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from pathlib import Path

from ..adapters.schedule import LambdaSchedule
from .config import ADAPTER_CONFIGS, DERIVED, TrainConfig, _read_yaml

_COMMENT = re.compile(r"^\s+(\w+): [^=]+=.*?\s#\s*(.+)$")
_ATTRIBUTE = re.compile(r"^\s+(\w+): (.+)$")


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its one-line help, from ``cls`` and its dataclass bases (a subclass's own text wins)."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        found.update(_docstring_attributes(klass.__doc__ or ""))
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _COMMENT.match(line)
            if m:
                found[m.group(1)] = m.group(2)
    return found


def _docstring_attributes(doc: str) -> dict[str, str]:
    """The first sentence of each entry of a Google-style ``Attributes:`` section (entries may wrap)."""
    _, _, section = doc.partition("Attributes:")
    entries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        m = _ATTRIBUTE.match(line)
        if m and not line.startswith(" " * 12):
            name, entries[m.group(1)] = m.group(1), m.group(2)
        elif name and line.strip():
            entries[name] += " " + line.strip()
    return {k: re.split(r"\.\s+(?=[A-Z(])", v)[0].rstrip(".").replace("``", "") for k, v in entries.items()}


def recipe_usage(script: str, default_config: str | Path | None, method: str | None = None) -> str:
    """The help text of a recipe script: the keys of ``method`` (default: the script YAML's)."""
    yaml_values = _read_yaml(str(default_config)) if default_config else {}
    method = method or yaml_values.get("method", "sora")
    lines = [
        f"usage: accelerate launch {script} [--config FILE.yaml] [--KEY VALUE ...] [--debug] [--verbose]",
        "",
        f"Without --config it runs {os.path.relpath(default_config)}." if default_config else "",
        "Values are read as YAML (--r 16, --target_modules '[q_proj, v_proj]'); --debug shows full tracebacks,",
        "--verbose the libraries' own warnings (deprecations, DeepSpeed's accelerator guess), hidden by default.",
        "Defaults: the dataclass default, or the script's YAML value (marked *) where it sets one.",
        f"These are the keys of method: {method}; `--method {'adalora' if method == 'sora' else 'sora'} --help` "
        "lists the other method's.",
    ]
    groups = [("recipe keys", TrainConfig, {"adapter", "sparsity"}),
              (f"adapter keys (method: {method})", ADAPTER_CONFIGS[method], set(DERIVED))]
    if method == "sora":
        groups.append(("sparsity schedule keys", LambdaSchedule, set()))
    for title, cls, skip in groups:
        helps = field_help(cls)
        lines += ["", f"{title}, {cls.__name__}:"]
        lines += [_key_line(f, yaml_values, helps.get(f.name, "")) for f in dataclasses.fields(cls) if f.name not in skip]
    return "\n".join(lines)


def _key_line(f: dataclasses.Field, yaml_values: dict, help_text: str) -> str:
    if f.name in yaml_values:
        default = f"{yaml_values[f.name]!r}*"
    elif f.default is not dataclasses.MISSING:
        default = repr(f.default)
    else:
        default = repr(f.default_factory())  # type: ignore[misc]
    default = default if len(default) <= 36 else default[:33] + "..."
    return f"  --{f.name} {default}".ljust(45) + " " + help_text
