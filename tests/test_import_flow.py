"""Pins the one-way import flow of the package (parsed with `ast`).

CLIs -> experiment -> tasks -> (distribution, which wraps) models -> layers;
data_pipelines, eval and the run-directory helpers are below everything and
import no moe_keras model code. A module may import modules of its own unit
and of any lower tier, nothing else; imports inside functions count too.
"""

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("moe_keras", "data_pipelines", "eval")

# Tiers, top to bottom; each tier lists its units (a package or a module;
# "moe_keras.__init__" is the package's own __init__.py only).
TIERS = (
    (
        "moe_keras.train",
        "moe_keras.evaluate",
        "moe_keras.decode",
        "moe_keras.export",
        "moe_keras.tf_server",
    ),
    ("moe_keras.cli_common",),
    ("moe_keras.experiment",),
    ("moe_keras.tasks",),
    ("moe_keras.distribution",),
    ("moe_keras.models", "moe_keras.optimizers", "moe_keras.schedules"),
    ("moe_keras.layers",),
    (
        "data_pipelines",
        "eval",
        "moe_keras.reliability",
        "moe_keras.learning_curve",
        "moe_keras.__init__",
    ),
    ("moe_keras.atomic_file",),  # files written whole: used by all above
    ("moe_keras.tf_allocator",),  # imported by moe_keras/__init__.py first
)  # pyformat: disable


def module_names(repo=REPO, roots=ROOTS):
  """{dotted module name: path} of every .py file under `roots`."""
  names = {}
  for root in roots:
    for directory, _, files in os.walk(os.path.join(repo, root)):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, repo)[: -len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        names[".".join(parts)] = path
  return names


def import_edges(repo=REPO, roots=ROOTS):
  """[(importer, imported, line)] for every import of a module in `roots`.

  `from a import b` is an edge to a.b when that is a module of the tree,
  else to a; relative imports are resolved against the importer.
  """
  modules = module_names(repo, roots)
  edges = []
  for importer, path in sorted(modules.items()):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    is_package = path.endswith("__init__.py")
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          package = importer.split(".")
          package = package if is_package else package[:-1]
          package = package[: len(package) - (node.level - 1)]
          base = ".".join(package + ([base] if base else []))
        for alias in node.names:
          full = f"{base}.{alias.name}"
          targets.append(full if full in modules else base)
      for target in targets:
        if target.split(".")[0] in roots:
          edges.append((importer, target, node.lineno))
  return edges


def unit_of(module, tiers=TIERS):
  """(tier index, unit) of `module`: its longest listed prefix, or None."""
  best = None
  for index, units in enumerate(tiers):
    for unit in units:
      if module + ".__init__" == unit or (
          not unit.endswith(".__init__")
          and (module == unit or module.startswith(unit + "."))
      ):
        if best is None or len(unit) > len(best[1]):
          best = (index, unit)
  return best


def violations(edges, tiers=TIERS):
  """One line per edge that breaks the flow, or per module in no tier."""
  found = []
  for importer, imported, line in edges:
    source, target = unit_of(importer, tiers), unit_of(imported, tiers)
    for module, unit in ((importer, source), (imported, target)):
      if unit is None:
        found.append(f"{module} is in no tier of TIERS: place it there")
    if source is None or target is None or source[1] == target[1]:
      continue
    if target[0] <= source[0]:
      found.append(
          f"{importer}:{line} imports {imported}: {source[1]} may import"
          " only its own unit and lower tiers"
      )
  return sorted(set(found))


def test_package_imports_flow_one_way():
  edges = import_edges()
  assert len(edges) > 50, "the parser found almost no imports"
  problems = violations(edges)
  assert not problems, "\n".join(problems)


def test_checker_rejects_a_back_edge():
  good = [
      ("moe_keras.distribution.sharded_experts", "moe_keras.layers", 1),
      ("moe_keras.tasks.lm_task", "data_pipelines.batching", 2),
      ("moe_keras.layers.sparse_moe", "moe_keras.layers.dispatch", 3),
  ]
  assert not violations(good)
  bad = [("moe_keras.layers.sparse_moe", "moe_keras.distribution", 7)]
  assert violations(good + bad) == [
      "moe_keras.layers.sparse_moe:7 imports moe_keras.distribution:"
      " moe_keras.layers may import only its own unit and lower tiers"
  ]
  # Same tier, other unit: eval must not reach into data_pipelines either.
  assert violations([("eval.bleu", "data_pipelines.mt", 3)])
  assert violations([("moe_keras.newthing", "moe_keras.layers", 1)]) == [
      "moe_keras.newthing is in no tier of TIERS: place it there"
  ]


def test_parser_sees_function_level_and_relative_imports(tmp_path):
  package = tmp_path / "moe_keras"
  (package / "layers").mkdir(parents=True)
  (package / "distribution").mkdir()
  for name in ("__init__.py", "layers/__init__.py", "distribution/__init__.py"):
    (package / name).write_text("")
  (package / "distribution" / "sharded.py").write_text(
      "from ..layers import core\n"
  )
  (package / "layers" / "core.py").write_text(
      "def build():\n"
      "  from moe_keras.distribution import sharded\n"
      "  return sharded\n"
  )
  edges = import_edges(repo=str(tmp_path), roots=("moe_keras",))
  assert ("moe_keras.layers.core", "moe_keras.distribution.sharded", 2) in (
      edges
  )
  assert ("moe_keras.distribution.sharded", "moe_keras.layers.core", 1) in (
      edges
  )
  assert violations(edges) == [
      "moe_keras.layers.core:2 imports moe_keras.distribution.sharded:"
      " moe_keras.layers may import only its own unit and lower tiers"
  ]
