"""lorajax: LoRA and parameter-efficient fine-tuning for JAX and Flax."""

from lorajax.adapters import init
from lorajax.adapters import layouts
from lorajax.adapters import with_layouts
from lorajax.adapters import merge
from lorajax.adapters import merge_quantized
from lorajax.adapters import unmerge
from lorajax.methods import eva
from lorajax.methods import loftq
from lorajax.methods import pissa
from lorajax.methods import prompts
from lorajax.methods.adalora import AdaLora
from lorajax.methods.bottleneck import Bottleneck
from lorajax.methods.bottleneck import houlsby_rules
from lorajax.methods.bottleneck import pfeiffer_rules
from lorajax.methods.dora import Dora
from lorajax.methods.ia3 import Ia3
from lorajax.methods.loha import LoHa
from lorajax.methods.lokr import LoKr
from lorajax.methods.low_rank import Lora
from lorajax.methods.oft import Oft
from lorajax.methods.qlora import QLora
from lorajax.methods.qlora import Quantized
from lorajax.methods.qlora import quantize_params
from lorajax.methods.vera import Vera
from lorajax.methods.quant import dequantize_params
from lorajax.methods.quant import quantized_nbytes
from lorajax.partition import combine
from lorajax.partition import count
from lorajax.partition import labels
from lorajax.partition import optimizer
from lorajax.partition import partition
from lorajax.partition import trainable_report
from lorajax.rewrite import discover_layouts
from lorajax.rewrite import fuse_attention
from lorajax.rewrite import lora
from lorajax.rewrite import RewriteError
from lorajax.kernels import AdapterParams
from lorajax.kernels import KernelLayout
from lorajax.spec import FREEZE
from lorajax.spec import LoraSpec
from lorajax.spec import resolve
from lorajax.spec import TRAIN
from lorajax.runtime.compiler import compiler_options
from lorajax.runtime.rng import unroll_threefry

__version__ = '0.1.0'
