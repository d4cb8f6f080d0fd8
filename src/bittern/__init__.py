"""bittern: 1.58-bit (BitNet b1.58) language models — train, pack, run fast, interoperate, measure."""

from .configs import CONFIGS, ModelConfig, get_config
from .model import KVCache, Transformer
from .modelfile import load_packed, save_packed
from .pack import TernaryWeight

__version__ = "0.1.0"

__all__ = ["CONFIGS", "ModelConfig", "get_config", "KVCache", "Transformer", "TernaryWeight",
           "load_packed", "save_packed", "__version__"]
