"""Serving many adapters over one frozen base.

  AdapterRegistry   named adapters; switch, disable, mix per example, combine
  combine           cat / linear / SVD combination of adapters
"""

from lorajax.serving.combine import combine
from lorajax.serving.registry import AdapterRegistry
