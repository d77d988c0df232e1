"""Serving many adapters over one frozen base.

  registry.AdapterRegistry   named adapters: switch, disable, mix per example
  weighted.weighted_adapter  cat / linear / SVD weighted sum of adapters
"""

from lorajax.serving.registry import AdapterRegistry
