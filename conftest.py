"""pytest: what ``--doctest-modules`` (pyproject.toml) does not import.

The command modules define absl flags when imported, so importing them all
in one process fails; tests/test_layers.py imports each in its own process.
"""

collect_ignore = ['lorajax/cli']
