"""Packaging for token-surgery (import `surgery`, CLI `surgery`).

The built-in backbone plugins live in the repository's `plugins/` folder and are installed as the
`surgery_plugins` package; they are found through the `surgery.backbones` entry points exactly as
a third-party plugin is.
"""

from setuptools import find_packages, setup

setup(
    name="token-surgery",
    version="0.1.0",
    description="Change how many learned tokens a trained model uses, at runtime, without getting it wrong.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["surgery", "surgery.*"])
    + ["surgery_plugins"] + [f"surgery_plugins.{p}" for p in find_packages("plugins")],
    package_dir={"surgery_plugins": "plugins"},
    install_requires=[
        "torch>=2.4",
        "timm>=1.0.9",
        "pluggy>=1.3",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={"dev": ["pytest>=8", "hypothesis>=6"]},
    entry_points={
        "console_scripts": ["surgery = surgery.cli:main"],
        "surgery.backbones": [
            "timm_vit = surgery_plugins.timm_vit",
            "llama_adapter_v2 = surgery_plugins.llama_adapter.plugin",
        ],
        "pytest11": ["surgery = surgery.testing"],
    },
)
