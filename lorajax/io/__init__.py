"""Adapters as files: lorajax's own format and Hugging Face PEFT's.

  save_adapter / load_adapter      adapter + spec + base fingerprint
                                   (safetensors + JSON, or Orbax)
  export_peft / import_peft        adapter_config.json + adapter_model.safetensors
  export_merged                    a merged model as an HF-layout checkpoint
  spec_to_json / spec_from_json    a LoraSpec as JSON
"""

from lorajax.io.adapter_files import AdapterBundle
from lorajax.io.adapter_files import AdapterFileError
from lorajax.io.adapter_files import load_adapter
from lorajax.io.adapter_files import save_adapter
from lorajax.io.hf_models import export_merged
from lorajax.io.hf_models import hf_model
from lorajax.io.peft_export import export_peft
from lorajax.io.peft_format import import_peft
from lorajax.io.peft_format import PeftAdapter
from lorajax.io.peft_format import PeftFormatError
from lorajax.io.spec_json import register_provider
from lorajax.io.spec_json import spec_from_json
from lorajax.io.spec_json import spec_to_json
