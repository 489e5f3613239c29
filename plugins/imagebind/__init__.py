"""ImageBind backbone plugin: our own implementation with upstream's key names and numerics, and
each modality's CLS-token count as a token site (`num_cls_tokens.<modality>`). See docs/imagebind.md."""
