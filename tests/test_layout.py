"""The house rules of docs/architecture.md, checked on the source tree:

- no import cycle, counting imports inside functions (lazy ones) and modules
  named as strings to `importlib.import_module`;
- nothing below the benchmarks and the CLI imports them, and no benchmark
  imports the CLI;
- TensorFlow, SeqIO and t5 are imported only on the data side (`tasks/`,
  `paxgpt/data/`), and the JAX-only modules import without them;
- PartitionSpecs and shard counts are written only in `paxgpt/model/sharding.py`;
- commands are defined only in `paxgpt/cli/`;
- the document's table of rooms names every module, and every module it names
  exists.
"""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("paxgpt", "kernels", "tasks")
DOC = os.path.join(ROOT, "docs", "architecture.md")
DATA_SIDE = ("tasks", "paxgpt.data")
TOP = ("paxgpt.bench", "paxgpt.cli")  # nothing else may import these rooms
HEAVY = ("tensorflow", "tensorflow_text", "seqio", "t5")


def _modules():
  """{module name: path} of every module of the three packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[module.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imported_names(path):
  """Every module name an import statement anywhere in `path` names (module
  level or inside a function), and every string constant that is exactly a
  project module's name (what `importlib.import_module` is given)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
        and node.value in MODULES:
      names.add(node.value)
  return names


def _in(module, rooms):
  return any(module == r or module.startswith(r + ".") for r in rooms)


GRAPH = {m: {n for n in _imported_names(p) if n in MODULES} - {m} for m, p in MODULES.items()}


def test_no_import_cycles_lazy_imports_included():
  # A package's __init__ importing its own submodules is how packages work; a
  # cycle needs a submodule importing back into a module that imports it.
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for dep in sorted(GRAPH[m]):
      if dep == m.rpartition(".")[0] or m == dep.rpartition(".")[0]:
        continue  # package <-> its own submodule
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        pytest.fail(f"import cycle: {' -> '.join(cycle)}")
      if dep not in state:
        visit(dep)
    stack.pop()
    state[m] = "done"
  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_cycle_check_sees_lazy_imports(tmp_path):
  # The check itself: an import inside a function counts.
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from paxgpt.cli import main\n  return main\n")
  assert "paxgpt.cli.main" in _imported_names(str(path))


def test_nothing_below_imports_the_benchmarks_or_the_cli():
  offenders = [(m, d) for m, deps in GRAPH.items() for d in deps
               if _in(d, TOP) and not _in(m, TOP)]
  offenders += [(m, d) for m, deps in GRAPH.items() for d in deps
                if _in(m, ("paxgpt.bench",)) and _in(d, ("paxgpt.cli",))]
  assert offenders == []


def test_tensorflow_seqio_and_t5_only_on_the_data_side():
  offenders = sorted(
      (m, n) for m, p in MODULES.items() if not _in(m, DATA_SIDE)
      for n in _imported_names(p) if n.split(".")[0] in HEAVY)
  assert offenders == []


# Modules that must import on a box with JAX, Flax, Optax, Orbax and gin but no
# TensorFlow, SeqIO or t5 (the GPU box; `paxgpt plan` on a TPU VM).
JAX_ONLY = ("kernels", "paxgpt.model.gpt", "paxgpt.model.sharding", "paxgpt.model.accounting",
            "paxgpt.model.info", "paxgpt.config.checks", "paxgpt.config.gin_flags",
            "paxgpt.config.model_files", "paxgpt.training.optim", "paxgpt.training.train_step",
            "paxgpt.store.checkpoint", "paxgpt.store.model_dir", "paxgpt.store.run_lock",
            "paxgpt.decoding.sampling", "paxgpt.interop.hf", "paxgpt.bench.decode",
            "paxgpt.bench.train", "paxgpt.bench.gpu_check")


def test_jax_only_modules_import_without_tensorflow():
  blocker = ("import sys\n"
             "class Block:\n"
             "  def find_spec(self, name, path=None, target=None):\n"
             "    if name.split('.')[0] in ('tensorflow', 'seqio', 't5', 'tensorflow_text'):\n"
             "      raise ImportError('blocked: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n")
  code = blocker + "".join(f"import {m}\n" for m in JAX_ONLY) + "print('ok')"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def _source_files():
  for module, path in MODULES.items():
    yield module, path, open(path, encoding="utf-8").read()


def test_partition_specs_are_written_only_in_the_sharding_room():
  offenders = [m for m, _, text in _source_files()
               if re.search(r"\bPartitionSpec\b|\bNamedSharding\(", text)
               and m != "paxgpt.model.sharding"]
  assert offenders == []


def test_shard_counts_are_computed_only_in_the_sharding_room():
  # Mesh axis sizes multiplied by hand (data x fsdp ...) instead of asking the rules.
  pattern = re.compile(r"""axis_sizes\[["'](data|fsdp|tensor)["']\]|mesh\.shape\[["']""")
  offenders = [m for m, _, text in _source_files()
               if pattern.search(text) and m != "paxgpt.model.sharding"]
  assert offenders == []


def test_commands_are_defined_only_in_the_cli():
  offenders = [m for m, _, text in _source_files()
               if re.search(r"^def \w+_command\(", text, re.M)]
  assert offenders == []
  from paxgpt.cli import commands, main
  for name, command in main.COMMANDS.items():
    assert callable(getattr(commands, command.function)), name


def _rooms_table():
  """The paths in the first column of the document's rooms table."""
  text = open(DOC, encoding="utf-8").read()
  table = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
  paths = []
  for line in table.splitlines():
    if line.startswith("| `"):
      first = line.split("|")[1]
      paths += re.findall(r"`([^`]+)`", first)
  return paths


def test_the_rooms_table_names_every_module_and_nothing_else():
  named = _rooms_table()
  assert named, "docs/architecture.md has no rooms table"
  missing = [p for p in named if not os.path.exists(os.path.join(ROOT, p))]
  assert missing == [], f"the document names paths that do not exist: {missing}"
  covered = set()
  for p in named:
    full = os.path.join(ROOT, p)
    if os.path.isdir(full):
      covered.update(os.path.relpath(path, ROOT) for m, path in MODULES.items()
                     if path.startswith(full.rstrip("/") + os.sep)
                     and os.path.dirname(path) == full.rstrip("/"))
    else:
      covered.add(p)
  modules = {os.path.relpath(p, ROOT) for m, p in MODULES.items()
             if m.startswith("paxgpt.") and not p.endswith("__init__.py")}
  assert sorted(modules - covered) == [], "modules missing from docs/architecture.md"


def test_no_file_refers_to_the_shared_folder():
  listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
  if listed.returncode:
    pytest.skip("not a git checkout")
  folder = os.path.join("..", "shared")  # spelled so that this file does not name it
  offenders = [f for f in listed.stdout.split()
               if os.path.isfile(os.path.join(ROOT, f))
               and folder in open(os.path.join(ROOT, f), encoding="utf-8",
                                       errors="replace").read()]
  assert offenders == []
