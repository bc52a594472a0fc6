"""rece-tool: erase concepts from Stable Diffusion checkpoints with RECE, audit, sign."""

__version__ = "0.1.0"
