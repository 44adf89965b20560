"""rank1-hf: the rank1 reasoning rerankers on plain Hugging Face transformers, without vLLM."""

from .errors import Rank1Error
from .judgement import Judgement

__all__ = ["Rank1", "rank1", "Judgement", "Rank1Error"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Rank1 pulls in torch and transformers; importing them lazily keeps light commands (evaluate, plan
    # from a config, store tools) quick to start.
    if name == "Rank1":
        from .ranker import Rank1

        return Rank1
    if name == "rank1":  # the drop-in for the official rank1 class
        from .compat import rank1

        return rank1
    raise AttributeError(f"module 'rank1_hf' has no attribute {name!r}")
