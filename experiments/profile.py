"""The old command ``python -m experiments.profile``: lorajax.cli.profile."""

from lorajax.cli.profile import main  # pylint: disable=unused-import
from lorajax.cli.profile import run

if __name__ == '__main__':
  run()
