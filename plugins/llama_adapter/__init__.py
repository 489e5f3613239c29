"""LLaMA-Adapter V2 multimodal backbone (work in progress in this session)."""
