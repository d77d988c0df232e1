"""pytest: what ``--doctest-modules`` (pyproject.toml) does not import, and
the Hypothesis profiles of the differential tests.

The command modules define absl flags when imported, so importing them all
in one process fails; tests/test_layers.py imports each in its own process.

Hypothesis: ``ci`` (the default) keeps the generated cases few enough for
the test command; ``--hypothesis-profile=thorough`` runs many more.
"""

from hypothesis import HealthCheck
from hypothesis import settings


collect_ignore = ['lorajax/cli']

settings.register_profile(
    'ci', max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    'thorough', max_examples=150, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile('ci')
