"""The package's layers point down only, and no module imports another module's private name.

Layers, bottom to top: base (``errors``, ``files``, ``paths``) -> ``data`` and ``sampler`` -> ``lmm``
-> ``model`` -> ``trainer`` -> the top (``config``, ``utils``, ``quick_start``, ``cli``, ...). Every
import is read from the source (module level and inside functions), so a lazy import inside a
function counts as much as one at the top of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import recbole_mm

PACKAGE = Path(recbole_mm.__file__).parent
BASE = {"recbole_mm", "recbole_mm.errors", "recbole_mm.files", "recbole_mm.paths"}
LAYERS = [("base", 0), ("data", 1), ("sampler", 1), ("lmm", 2), ("model", 3), ("trainer", 4)]
TOP = 5


def layer_of(module: str) -> int:
    if module in BASE:
        return 0
    parts = module.split(".")
    for name, level in LAYERS:
        if len(parts) > 1 and parts[1] == name:
            return level
    return TOP


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if "properties" in rel.parts:
            continue
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` of every recbole_mm import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "recbole_mm":
            names = [a.name for a in node.names]
            # `from recbole_mm.lmm import prompts` imports a module
            targets = [(f"{node.module}.{n}" if f"{node.module}.{n}" in MODULES else node.module) for n in names]
            for target, name in zip(targets, names):
                found.append((node.lineno, target, [] if target.endswith("." + name) else [name]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "recbole_mm":
                    found.append((node.lineno, alias.name, []))
    return found


MODULES = modules()


def test_the_layer_table_knows_every_module():
    assert {"recbole_mm.files", "recbole_mm.data.preparation", "recbole_mm.lmm.hub", "recbole_mm.model.registry",
            "recbole_mm.trainer.registry", "recbole_mm.trainer.standalone"} <= set(MODULES)
    assert layer_of("recbole_mm.files") < layer_of("recbole_mm.data.item_store") < layer_of("recbole_mm.lmm.prompts") \
        < layer_of("recbole_mm.model.prime") < layer_of("recbole_mm.trainer.prime") < layer_of("recbole_mm.config")


def test_imports_point_down():
    upward = [f"{module} (layer {layer_of(module)}) line {line}: {target} (layer {layer_of(target)})"
              for module, path in sorted(MODULES.items()) for line, target, _ in imports_of(path)
              if layer_of(target) > layer_of(module)]
    assert not upward, "imports of upper layers:\n" + "\n".join(upward)


def test_no_private_names_of_other_modules():
    private = [f"{module} line {line}: {target}.{name}" for module, path in sorted(MODULES.items())
               for line, target, names in imports_of(path)
               for name in names if name.startswith("_") and not name.startswith("__") and target != module]
    assert not private, "imports of other modules' private names:\n" + "\n".join(private)


def test_the_checker_sees_an_upward_and_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from recbole_mm.trainer.prime import PRIMETrainer\n"
                   "from recbole_mm.lmm.backbone import _load_error\n", encoding="utf-8")
    found = imports_of(bad)
    assert sorted((t, tuple(n)) for _, t, n in found) == [("recbole_mm.lmm.backbone", ("_load_error",)),
                                                          ("recbole_mm.trainer.prime", ("PRIMETrainer",))]
    assert layer_of("recbole_mm.trainer.prime") > layer_of("recbole_mm.model.prime")
