"""Model code shared by servers and clients: what a model is made of and where its weights live.

- ``families``: one adapter per model family (how a block is built and called, what the client keeps)
- ``weights``: read selected tensors from safetensors files
- ``modelpath``: resolve ``--model`` to a local folder (the default model is converted once from GGUF)
- ``adapters``: LoRA adapters of the blocks (weights, their linear layers, wire form, folder format)
"""
