"""The package's layers (docs/architecture.md): a contract, no cycles, all import.

The contract is ``[tool.importlinter]`` in pyproject.toml, checked by
import-linter's ``lint-imports``, the tool CI runs.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Modules that define absl flags at import: one process each.
FLAG_MODULES = ('lorajax.cli.',)


def _lint_imports() -> str:
  if importlib.util.find_spec('importlinter') is None:
    pytest.skip('import-linter is not installed (pip install import-linter)')
  exe = shutil.which('lint-imports') or os.path.join(
      os.path.dirname(sys.executable), 'lint-imports')
  if not os.path.exists(exe):
    pytest.skip('import-linter is installed but lint-imports is not on PATH')
  return exe


def test_layers_contract_holds():
  """Lower layers never import higher ones; lorajax never imports torch."""
  proc = subprocess.run([_lint_imports(), '--no-cache'], cwd=ROOT,
                        capture_output=True, text=True, check=False,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_module_imports_itself_through_others():
  """No import cycle among lorajax's modules, lazy imports included.

  A package's ``__init__`` re-exporting its submodules is not a cycle:
  imports of the ``lorajax`` root (the public facade) are left out.
  """
  _lint_imports()
  import grimp  # pylint: disable=g-import-not-at-top (import-linter's own)
  graph = grimp.build_graph('lorajax')
  cycles = []
  for module in sorted(graph.modules):
    for imported in graph.find_modules_directly_imported_by(module):
      if imported != 'lorajax' and graph.chain_exists(importer=imported,
                                                      imported=module):
        chain = graph.find_shortest_chain(importer=imported, imported=module)
        cycles.append(' -> '.join((module,) + tuple(chain)))
  assert not cycles, '\n'.join(cycles)


def _modules() -> list[str]:
  code = textwrap.dedent('''
      import pkgutil, lorajax
      for m in pkgutil.walk_packages(lorajax.__path__, 'lorajax.'):
        print(m.name)
      ''')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, check=True,
                        timeout=300)
  return proc.stdout.split()


def test_every_module_imports_in_a_fresh_process():
  """Each module imports; the command modules each in their own process."""
  modules = _modules()
  assert 'lorajax.cli.train' in modules and 'lorajax.sweeps.runner' in modules
  plain = [m for m in modules if not m.startswith(FLAG_MODULES)]
  groups = [plain] + [[m] for m in modules if m.startswith(FLAG_MODULES)]
  for group in groups:
    code = ('import importlib\n'
            f'for name in {group!r}:\n'
            '  importlib.import_module(name)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, f'{group}:\n{proc.stderr[-3000:]}'
