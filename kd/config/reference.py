"""The reference table of every config key (docs/config.md's, printed by `python -m kd.config`): key,
default and the doc string under each field of kd/config/schema.py."""

from __future__ import annotations

from kd.config.schema import Config, _leaves, flat_dict_defaults


def reference() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf, docs taken from the string under each field."""
    import ast
    import inspect

    docs: dict[tuple[str, str], str] = {}
    tree = ast.parse(inspect.getsource(inspect.getmodule(Config)))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[(cls.name, node.target.id)] = " ".join(str(nxt.value.value).split())
    defaults = flat_dict_defaults()
    return [(key, defaults[key], docs.get((cls.__name__, name), "")) for key, cls, name in _leaves()]


def table() -> str:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{key}` | `{default}` | {doc.replace('|', '&#124;')} |" for key, default, doc in reference()]
    return "\n".join(rows)
