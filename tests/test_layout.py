"""The house rules of ../shared/design.md, checked on the source tree: no import
cycles, the JAX-only modules import without TensorFlow, shardings are written
only in sharding.py, commands live only in paxgpt/cli/."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("paxgpt", "kernels", "tasks")


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


def _top_level_imports(path, modules):
  """Project modules imported when `path` is imported (module-level statements,
  not those inside functions, which run later)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = set()
  for node in tree.body:
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Try):  # optional imports count too
      for inner in node.body:
        if isinstance(inner, (ast.Import, ast.ImportFrom)):
          names += [a.name for a in inner.names] + ([inner.module] if getattr(
              inner, "module", None) else [])
    found.update(n for n in names if n in modules)
  return found


def test_no_import_cycles():
  modules = _modules()
  graph = {m: _top_level_imports(p, modules) - {m} for m, p in modules.items()}
  # A package's __init__ importing its own submodules is how packages work; a
  # cycle needs a submodule importing back into a module that imports it.
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for dep in graph[m]:
      if dep == m.rpartition(".")[0] or m == dep.rpartition(".")[0]:
        continue  # package <-> its own submodule
      if state.get(dep) == "open":
        cycle = stack[stack.index(dep):] + [dep]
        pytest.fail(f"import cycle: {' -> '.join(cycle)}")
      if dep not in state:
        visit(dep)
    stack.pop()
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      visit(m)


# Modules that must import on a box with JAX, Flax, Optax and Orbax but no
# TensorFlow, SeqIO or t5 (the GPU box; `paxgpt plan` on a TPU VM).
JAX_ONLY = ("kernels", "paxgpt.model", "paxgpt.sharding", "paxgpt.optim", "paxgpt.accounting",
            "paxgpt.train_step", "paxgpt.checkpoint", "paxgpt.sampling", "paxgpt.model_dir",
            "paxgpt.hf", "paxgpt.bench_decode", "paxgpt.gpu_check")


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
  for module, path in _modules().items():
    yield module, path, open(path, encoding="utf-8").read()


def test_partition_specs_are_written_only_in_sharding_py():
  offenders = [m for m, _, text in _source_files()
               if re.search(r"\bPartitionSpec\b|\bNamedSharding\(", text)
               and m not in ("paxgpt.sharding",)]
  assert offenders == []


def test_shard_counts_are_computed_only_in_sharding_py():
  # Mesh axis sizes multiplied by hand (data x fsdp ...) instead of asking the rules.
  pattern = re.compile(r"""axis_sizes\[["'](data|fsdp|tensor)["']\]|mesh\.shape\[["']""")
  offenders = [m for m, _, text in _source_files()
               if pattern.search(text) and m != "paxgpt.sharding"]
  assert offenders == []


def test_commands_are_defined_only_in_the_cli():
  offenders = [m for m, _, text in _source_files()
               if re.search(r"^def \w+_command\(", text, re.M)]
  assert offenders == []
  from paxgpt.cli import commands, main
  for name, command in main.COMMANDS.items():
    assert callable(getattr(commands, command.function)), name
