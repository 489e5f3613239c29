"""ImageBind-LLM backbone plugin: ImageBind's embeddings (k CLS tokens -> k visual tokens) feeding
LLaMA's adapters; model (`model.py`, `bridge.py`, `knn.py`, `config.py`), official checkpoints
(`loading.py`) and the surgery plugin (`plugin.py`, the entry point). See docs/imagebind_llm.md."""
