"""medsynth: class-conditional diffusion on MONAI for labeled synthetic medical images."""

__version__ = "0.1.0"
