"""LLaMA-Adapter V2 multimodal backbone: model (`model.py`, `llama.py`, `clip.py`, `tokenizer.py`),
official checkpoints (`loading.py`) and the surgery plugin (`plugin.py`, the entry point).
See docs/llama_adapter.md."""
