"""Built-in backbone plugins, loaded through the `surgery.backbones` entry points."""
