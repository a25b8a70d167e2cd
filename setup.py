"""Installs the three top-level folders under one import root, `notellm2` (docs/layout.md):

    notellm2/            -> notellm2             (version, shipped-file lookup, errors)
    launcher/            -> notellm2.launcher     (the application: CLI, training, evaluation, export)
    modeling/            -> notellm2.modeling     (the encoder library, with its vision plugins)
    data_shards/         -> notellm2.data_shards  (catalogs, mining, shards, the reader)
    ds_configs/*.json    -> notellm2/ds_configs   (package data: DeepSpeed JSONs)
    configs/**           -> notellm2/configs      (package data: shipped experiment YAMLs, architectures)

Dependencies: requirements.txt pins them all; a line ending in `# extra: NAME` belongs to the optional
extra NAME, the others to the core. torch is pinned here but installed first and explicitly
(scripts/setup.sh, docs/install.md), so that pip never resolves it to a CUDA build by itself.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDERS = ("launcher", "modeling", "data_shards")


def _version() -> str:
    with open(os.path.join(HERE, "notellm2", "__init__.py")) as fh:
        return re.search(r'^__version__ = "([^"]+)"', fh.read(), re.M).group(1)


def _requirements(path: str):
    core, extras = [], {}
    with open(os.path.join(HERE, path)) as fh:
        for line in fh:
            spec, _, comment = line.partition("#")
            spec = spec.strip()
            if not spec:
                continue
            m = re.match(r"\s*extra:\s*(\w+)", comment)
            (extras.setdefault(m.group(1), []) if m else core).append(spec)
    return core, extras


core, extras = _requirements("requirements.txt")
extras["gpu"] = ["flash-attn==2.8.3"]  # CUDA machines only: pip install flash-attn==2.8.3 --no-build-isolation
extras["all"] = sorted({r for name, reqs in extras.items() if name != "gpu" for r in reqs})
extras["dev"] = _requirements("requirements-dev.txt")[0]

packages = ["notellm2", "notellm2.ds_configs", "notellm2.configs", "notellm2.configs.arch"]
package_dir = {"notellm2": "notellm2", "notellm2.ds_configs": "ds_configs", "notellm2.configs": "configs"}
for folder in FOLDERS:
    packages += [f"notellm2.{folder}"] + [f"notellm2.{folder}.{p}" for p in find_packages(folder)]
    package_dir[f"notellm2.{folder}"] = folder
packages += [f"notellm2.configs.arch.{d}" for d in sorted(os.listdir(os.path.join(HERE, "configs", "arch")))
             if os.path.isdir(os.path.join(HERE, "configs", "arch", d))]

setup(
    name="notellm2",
    version=_version(),
    description="Training stack for NoteLLM-2 style multimodal note encoders (I2I recommendation)",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"notellm2.ds_configs": ["*.json"], "notellm2.configs": ["*.yaml"],
                  "notellm2.configs.arch": ["*.md"], **{p: ["*.json"] for p in packages if p.startswith("notellm2.configs.arch.")}},
    install_requires=["torch==2.13.0"] + core,
    extras_require=extras,
    entry_points={"console_scripts": ["notellm2=notellm2.launcher.cli:main"]},
)
