"""Write tests/data/vllm_engine_args.json: the field names of vLLM's EngineArgs (vllm/engine/arg_utils.py) at one
released version, with their defaults where they are plain values, read from a vLLM wheel by parsing its source
(ast); nothing is imported or copied. The list is what tests/test_vllm_engine_args.py holds plexus to.

Not run by the tests (it needs the wheel, which needs the network). To refresh the list:

    pip download vllm==0.32.0 --no-deps --only-binary :all: -d /tmp/vllm
    python tests/data/make_vllm_engine_args.py /tmp/vllm/vllm-0.32.0-*.whl
"""
from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).with_name("vllm_engine_args.json")
_MISSING = object()


def _literal(node: ast.AST | None) -> object:
    if node is None:
        return _MISSING
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return _MISSING


def _field_default(node: ast.AST | None) -> object:
    """A config-class attribute's default: a literal, or field(default=...) / Field(default=...) /
    field(default_factory=dict|list)."""
    value = _literal(node)
    if value is not _MISSING or not isinstance(node, ast.Call):
        return value
    for keyword in node.keywords:
        if keyword.arg == "default":
            return _literal(keyword.value)
        if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
            return {"dict": {}, "list": []}.get(keyword.value.id, _MISSING)
    return _MISSING


def _config_classes(wheel: zipfile.ZipFile) -> dict[str, dict[str, ast.AST | None]]:
    """{class name: {attribute: value node}} for every class in vllm/config/."""
    classes: dict[str, dict[str, ast.AST | None]] = {}
    for name in wheel.namelist():
        if name.startswith("vllm/config/") and name.endswith(".py"):
            for node in ast.walk(ast.parse(wheel.read(name))):
                if isinstance(node, ast.ClassDef):
                    classes.setdefault(node.name, {}).update(
                        {s.target.id: s.value for s in node.body
                         if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)})
    return classes


def _resolve(node: ast.AST | None, classes: dict) -> object:
    """EngineArgs' default expression: a literal, `Config.attr`, or `get_field(Config, "attr")`."""
    value = _literal(node)
    if value is not _MISSING:
        return value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        attrs = classes.get(node.value.id, {})
        return _field_default(attrs[node.attr]) if node.attr in attrs else _MISSING
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "get_field" and len(node.args) == 2:
        owner, attr = node.args[0], _literal(node.args[1])
        attrs = classes.get(getattr(owner, "id", ""), {})
        return _field_default(attrs[attr]) if attr in attrs else _MISSING
    return _MISSING


def main(wheel_path: str) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        version = {}
        for line in wheel.read("vllm/_version.py").decode().splitlines():
            if line.startswith(("__version__ = ", "__commit_id__ = ")):
                version[line.split()[0]] = ast.literal_eval(line.rsplit("=", 1)[1].strip())
        classes = _config_classes(wheel)
        tree = ast.parse(wheel.read("vllm/engine/arg_utils.py"))
    engine_args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs")
    fields = []
    for stmt in engine_args.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            entry = {"name": stmt.target.id, "type": ast.unparse(stmt.annotation)}
            default = _resolve(stmt.value, classes)
            if default is _MISSING:
                entry["default_expr"] = ast.unparse(stmt.value) if stmt.value is not None else None
            else:
                entry["default"] = default
            fields.append(entry)
    data = {"source": f"vllm {version['__version__']} (commit {version['__commit_id__']}), "
                      "vllm/engine/arg_utils.py class EngineArgs",
            "version": version["__version__"], "commit": version["__commit_id__"],
            "made_by": "tests/data/make_vllm_engine_args.py", "fields": fields}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}: {len(fields)} fields of vllm {version['__version__']}")


if __name__ == "__main__":
    main(sys.argv[1])
