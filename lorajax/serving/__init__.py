"""Serving many adapters over one frozen base.

  registry.AdapterRegistry   named adapters: switch, disable, mix per example
  combine.combine            cat / linear / SVD combination of adapters
"""

from lorajax.serving.registry import AdapterRegistry
