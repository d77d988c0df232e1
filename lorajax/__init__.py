"""lorajax: LoRA and parameter-efficient fine-tuning for JAX and Flax."""

from lorajax.adapters import init
from lorajax.adapters import merge
from lorajax.adapters import unmerge
from lorajax.methods.lora import Lora
from lorajax.partition import combine
from lorajax.partition import count
from lorajax.partition import labels
from lorajax.partition import optimizer
from lorajax.partition import partition
from lorajax.partition import trainable_report
from lorajax.rewrite import discover_layouts
from lorajax.rewrite import lora
from lorajax.rewrite import RewriteError
from lorajax.spec import FREEZE
from lorajax.spec import LoraSpec
from lorajax.spec import resolve
from lorajax.spec import TRAIN

__version__ = '0.1.0'
