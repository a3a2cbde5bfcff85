"""The package's layout: private modules stay private, no import circles, short files."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "enorm_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
  """(module imported, names taken from it) of every import in ``path``."""
  package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([module] if module else []))
      yield module, tuple(alias.name for alias in node.names)


def _is_private(dotted: str) -> bool:
  return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _sources(*folders):
  for folder in folders:
    yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
  """Outside the package nothing private of it is imported; inside it, private
  modules are (optax's `_src` style), private names are not."""
  bad = []
  for path in _sources("enorm_jax", "tests", "benchmarks", "experiments"):
    inside = path.is_relative_to(PACKAGE)
    for module, names in _imports(path):
      if module.split(".")[0] != "enorm_jax":
        continue
      if not inside and _is_private(module):
        bad.append(f"{path.relative_to(ROOT)}: imports {module}")
      for name in names:
        if name.startswith("_") and not (inside and _is_module(module, name)):
          bad.append(f"{path.relative_to(ROOT)}: from {module} import {name}")
  assert not bad, "\n".join(bad)


def _is_module(package: str, name: str) -> bool:
  folder = ROOT.joinpath(*package.split("."))
  return (folder / f"{name}.py").exists() or (folder / name / "__init__.py").exists()


def test_tests_and_benchmarks_use_no_private_attribute_of_a_project_module():
  bad = []
  for path in _sources("tests", "benchmarks"):
    imported = {alias.asname or alias.name for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                    "enorm_jax", "benchmarks", "experiments") for alias in node.names}
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in imported | {"enorm_jax"}):
        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)


def test_the_package_has_no_import_circle():
  modules = {_module_name(p): p for p in _sources("enorm_jax")}
  edges = {}
  for name, path in modules.items():
    targets = set()
    for module, names in _imports(path):
      for candidate in [f"{module}.{n}" for n in names] + [module]:
        if candidate in modules and candidate != name:
          targets.add(candidate)
          break
    edges[name] = targets - {m for m in targets if name.startswith(m + ".")}  # own package
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in edges[node]:
      if state.get(nxt) == "open":
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"
  for name in modules:
    if name not in state:
      visit(name, [name])


def test_every_file_is_readable_in_one_sitting():
  long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _sources(
      "enorm_jax", "tests", "benchmarks", "experiments")
          if (n := len(p.read_text().splitlines())) > 420]
  assert not long, long
