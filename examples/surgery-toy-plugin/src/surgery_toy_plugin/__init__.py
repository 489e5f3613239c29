"""Example token-surgery plugin: a tiny prompt-tuned encoder whose prompt count can be changed."""

from .model import PromptTunedEncoder

__all__ = ["PromptTunedEncoder"]
__version__ = "0.1.0"
