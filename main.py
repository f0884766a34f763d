"""Entry point: `python main.py --config config.json` (same as the `mlx-router` console script)."""

from mlx_router.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
