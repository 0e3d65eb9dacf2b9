"""Names and values of a sweep for people: short hyperparameter names, table cells, legend labels, Markdown tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Readable unique names of dotted keys: ``model.init_args.optimizer.init_args.lr`` → ``lr``,
    ``model.class_path`` → ``model``, with parent components added where two would collide."""

    def parts(k: str) -> list[str]:
        p = [x for x in k.split(".") if x not in ("init_args", "class_path")]
        return p or [k]

    out: dict[str, str] = {}
    depth = {k: 1 for k in keys}
    while True:
        out = {k: ".".join(parts(k)[-depth[k] :]) for k in keys}
        clash = [k for k in keys if list(out.values()).count(out[k]) > 1 and depth[k] < len(parts(k))]
        if not clash:
            break
        for k in clash:
            depth[k] += 1
    return {k: (v if list(out.values()).count(v) == 1 else k) for k, v in out.items()}


def fmt_value(v: Any) -> str:
    """A cell: 4 significant digits for floats, class paths by their class name, blanks for missing."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, str) and v.startswith("{") and '"class_path"' in v:  # a whole optimizer/scheduler block
        try:
            node = json.loads(v)
            args = ", ".join(f"{k}={fmt_value(a)}" for k, a in (node.get("init_args") or {}).items())
            return f"{fmt_value(node['class_path'])}({args})"
        except (ValueError, KeyError, AttributeError):
            return v
    if isinstance(v, str) and "." in v and " " not in v and v.split(".")[-1][:1].isupper():
        return v.split(".")[-1]  # torch.optim.SGD -> SGD
    return str(v)


def value_labels(values: Sequence[Any]) -> dict[str, str]:
    """Legend labels of a hyperparameter's values (keyed by ``repr``): :func:`fmt_value`, except that whole
    ``class_path`` blocks show their class name plus only the arguments that tell two blocks of the same class apart
    (``SGD(lr=0.1)``, ``SGD(lr=0.01, momentum=0.8)``, ``Adam``)."""
    nodes: dict[str, dict] = {}
    for v in values:
        if isinstance(v, str) and v.startswith("{") and '"class_path"' in v:
            try:
                nodes[repr(v)] = json.loads(v)
            except ValueError:
                pass
    out = {repr(v): fmt_value(v) for v in values}
    by_class: dict[str, list[str]] = {}
    for key, node in nodes.items():
        by_class.setdefault(str(node.get("class_path")), []).append(key)
    for cls, keys in by_class.items():
        args = [nodes[k].get("init_args") or {} for k in keys]
        differ = sorted({a for d in args for a in d if len({json.dumps(x.get(a)) for x in args}) > 1})
        for k, a in zip(keys, args):
            shown = ", ".join(f"{d}={fmt_value(a[d])}" for d in differ if d in a)
            out[k] = fmt_value(cls) + (f"({shown})" if shown else "")
    return out


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame of cell texts as a Markdown (GitHub) table: its columns as the header, ``|`` escaped."""
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [list(frame.columns), *frame.to_numpy().tolist()]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in esc[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"
