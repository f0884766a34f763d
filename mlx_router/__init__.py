"""mlx-router: many MLX models behind one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
