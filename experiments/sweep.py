"""The old command ``python -m experiments.sweep``: runs lorajax.cli.sweep."""

from lorajax.cli.sweep import main  # pylint: disable=unused-import
from lorajax.cli.sweep import run

if __name__ == '__main__':
  run()
