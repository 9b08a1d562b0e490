"""vkd: vision and diffusion knowledge distillation.

Four distillation methods (BOOT, Feature 3DGS, HeLlO, SKT) on one training engine and one Gaussian
rasterizer backend. The command-line entry point is :mod:`vkd.cli`.
"""

__version__ = "0.1.0"
