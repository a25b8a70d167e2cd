from setuptools import setup


def _reqs(path):
    with open(path) as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


setup(
    name="notellm2",
    version="0.1.0",
    description="Training stack for NoteLLM-2 style multimodal note encoders (I2I recommendation)",
    python_requires=">=3.10",
    packages=["modeling", "data_shards", "launcher", "launcher.cli"],
    # torch is installed first and explicitly (scripts/setup.sh) so that pip never pulls a CUDA build.
    install_requires=["torch==2.13.0"] + _reqs("requirements.txt"),
    extras_require={
        # On CUDA machines: pip install flash-attn==2.8.3 --no-build-isolation (see docs/install.md).
        "gpu": ["flash-attn==2.8.3"],
        "dev": _reqs("requirements-dev.txt"),
    },
    entry_points={"console_scripts": ["notellm2=launcher.cli:main"]},
)
