"""The old command ``python -m experiments.train``: runs lorajax.cli.train."""

from lorajax.cli.train import main  # pylint: disable=unused-import
from lorajax.cli.train import run

if __name__ == '__main__':
  run()
