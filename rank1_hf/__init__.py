"""rank1-hf: the rank1 reasoning rerankers on plain Hugging Face transformers, without vLLM."""

from .errors import Rank1Error
from .judgement import Judgement
from .ranker import Rank1

__all__ = ["Rank1", "Judgement", "Rank1Error"]
__version__ = "0.1.0"
