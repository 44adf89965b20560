import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from rank1_hf import testing  # noqa: E402

# family name -> (tokenizer builder, model family); "qwen-plain" has no <think>/</think> added tokens,
# so its </think> spans three tokens, as in Llama 3 and Mistral.
FAMILIES = {
    "qwen": (lambda: testing.qwen_tokenizer(), "qwen2"),
    "qwen-plain": (lambda: testing.qwen_tokenizer(think_tokens=False), "qwen2"),
    "llama": (testing.llama3_tokenizer, "llama"),
    "mistral": (testing.mistral_tokenizer, "mistral"),
}
# How much the first token of </think> is boosted per family, so rows close it at varied steps.
PLANT_FACTOR = {"qwen": 3.0, "qwen-plain": 3.0, "llama": 2.0, "mistral": 3.0}

WORDS = (
    "cat dog bread oven yeast river mountain law court judge software python compiler vitamin protein "
    "football goal rain cloud engine battery museum painting"
).split()


def make_pairs(n: int, seed: int = 0, max_words: int = 60) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [
        (" ".join(rng.choices(WORDS, k=rng.randint(2, 6))), " ".join(rng.choices(WORDS, k=rng.randint(3, max_words))))
        for _ in range(n)
    ]


@pytest.fixture(scope="session")
def tokenizers():
    return {name: build() for name, (build, _) in FAMILIES.items()}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 with the real Qwen2.5 tokenizer, saved as a local model directory."""
    path = tmp_path_factory.getbasetemp() / "tiny-qwen"
    if not path.exists():
        tok = testing.qwen_tokenizer()
        testing.tiny_model(tok).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Qwen2 and the real Qwen2.5 tokenizer."""
    tok = testing.qwen_tokenizer()
    return testing.tiny_model(tok), tok


def ranker_for(tiny, **options):
    """A ranker over ``tiny`` with short reasoning (6 tokens), for API-level tests."""
    from rank1_hf.ranker import Rank1

    model, tok = tiny
    return Rank1.from_model(model, tok, max_new_tokens=6, context_size=512, batch_size=4, **options)
