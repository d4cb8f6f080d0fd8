"""bittern: 1.58-bit (BitNet b1.58) language models — train, pack, run fast, interoperate, measure."""

from .configs import CONFIGS, ModelConfig, get_config
from .model import KVCache, Transformer
from .modelfile import load_packed, save_packed
from .pack import TernaryWeight

__version__ = "0.1.0"


def from_pretrained(source: str, **kwargs):
    """Open a bittern directory, a Hugging Face checkpoint (dir or repo id) or a GGUF file.

    Returns ``LoadedModel(model, tokenizer, source_format)``; see :mod:`bittern.interop`.
    """
    from .interop import from_pretrained as _from_pretrained

    return _from_pretrained(source, **kwargs)


__all__ = ["CONFIGS", "ModelConfig", "get_config", "KVCache", "Transformer", "TernaryWeight",
           "load_packed", "save_packed", "from_pretrained", "__version__"]
