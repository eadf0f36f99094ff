from setuptools import find_packages, setup

# The plugin needs only torch, transformers and numpy; the recipes (fine-tuning, evaluation, lm-eval) pull their
# own dependencies as extras. `pip install 'ppa_hf[all]'` installs everything.
TRAIN = ["accelerate>=1.0", "peft>=0.13", "datasets>=3.0", "tqdm>=4.60"]
EVAL = ["datasets>=3.0", "evaluate>=0.4", "matplotlib>=3.7", "tqdm>=4.60"]
LM_EVAL = ["lm-eval>=0.4.5"]
GGUF = ["gguf>=0.10"]  # reading the embedded default model (a GGUF file)
ALL = sorted(set(TRAIN + EVAL + LM_EVAL + GGUF))

setup(
    name="ppa_hf",
    version="0.2.0",
    description="Power-based Partial Attention (PPA) for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppa_hf", "ppa_hf.*"]),
    package_data={"ppa_hf.recipes": ["metrics/*.py", "metrics/*/*.py", "lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "transformers>=5.0,<6",
        "numpy>=1.24",
    ],
    extras_require={
        "train": TRAIN,
        "eval": EVAL,
        "lm-eval": LM_EVAL,
        "gguf": GGUF,
        "all": ALL,
        "dev": ALL + ["pytest>=7", "triton>=3.0; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "ppa-hf=ppa_hf.cli:main",
            "ppa-lm-eval=ppa_hf.recipes.lm_eval:main",
        ]
    },
)
