"""The built-in transformers plugin (entry point `transformers`): Hugging Face and PEFT models' token counts.

The hooks are in `plugin.py`, one model family per file; docs/transformers.md says what each count means.
"""
