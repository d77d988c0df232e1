"""Data through TFDS: offline builders, catalog sources, encoding, batches."""

from lorajax.data.builders import default_data_dir
from lorajax.data.builders import prepare
from lorajax.data.loader import ArraySource
from lorajax.data.loader import BatchIterator
from lorajax.data.sources import get_source
from lorajax.data.sources import get_spec
from lorajax.data.sources import register
from lorajax.data.text import encode_classification
from lorajax.data.text import encode_source
from lorajax.data.text import pack_lm
from lorajax.data.text import pad_lm
