from setuptools import find_packages, setup

setup(
    name="ppa_hf",
    version="0.1.0",
    description="Power-based Partial Attention (PPA) for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppa_hf", "ppa_hf.*"]),
    package_data={"ppa_hf": ["metrics/*.py", "metrics/*/*.py", "lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.5",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "peft>=0.13",
        "datasets>=3.0",
        "evaluate>=0.4",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tqdm>=4.60",
    ],
    extras_require={
        "gguf": ["gguf>=0.10"],
        "lm-eval": ["lm-eval>=0.4.5"],
        "dev": ["pytest>=7", "gguf>=0.10", "lm-eval>=0.4.5", "triton>=3.0; platform_system == 'Linux'"],
    },
    entry_points={
        "console_scripts": [
            "ppa-hf=ppa_hf.cli:main",
            "ppa-lm-eval=ppa_hf.lm_eval_main:main",
        ]
    },
)
