"""Model code shared by servers and clients: what a model is made of and where its weights live.

- ``families``: the registry of supported families (``get_family``, ``family_for``, ``FAMILIES``) and
  ``load_config`` (a model folder's config, through the family's own config class where it has one)
- ``base``: the adapter interface and its default (rotary decoder families whose attention uses the registry)
- ``llama``: Llama, Mistral, Qwen2, Qwen3, Phi-3; ``gemma``: Gemma 2, Gemma 3 (text); ``moe``: Mixtral,
  Qwen2-MoE (experts fused at load); ``bloom``: BLOOM (ALiBi); ``falcon``: Falcon (both architectures)
- ``decoder``: our own Llama config, block, norm and rotary embedding (transformers' names and arithmetic,
  without importing its modeling code)
- ``weights``: read selected tensors from safetensors files
- ``modelpath``: resolve ``--model`` to a local folder (the default model is converted once from GGUF)
- ``adapters``: LoRA adapters of the blocks (weights, their linear layers, wire form, folder format)
"""
