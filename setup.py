"""Build tinyllm: the Python package, tinyllm.export (from export/) and the C runtime extension."""
from setuptools import setup

setup(
    name="tinyllm",
    version="0.1.0",
    description="Train a tiny llama-architecture model and run it anywhere on CPU",
    python_requires=">=3.10",
    packages=["tinyllm", "tinyllm.train", "tinyllm.export"],
    package_dir={"tinyllm": "python/tinyllm", "tinyllm.export": "export"},
    install_requires=["numpy", "sentencepiece", "tqdm"],
    extras_require={
        "train": ["torch", "matplotlib"],
        "dev": ["pytest", "cffi", "gguf", "matplotlib"],
    },
    entry_points={"console_scripts": ["tinyllm=tinyllm.cli:main"]},
)
