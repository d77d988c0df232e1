"""lorajax's models: Flax BERT and Llama, and Hugging Face checkpoints.

``load(path)`` reads a local Hugging Face directory (``lorajax.models.auto``).
"""

from lorajax.models.auto import LoadedModel
from lorajax.models.auto import load
