"""How many waiting prompts one forward pass of prompt tokens takes (`core/prefill.py`)."""

from __future__ import annotations

import pytest

from mlx_router.core.prefill import prompts_that_fit


@pytest.mark.parametrize(
    ("chunks", "budget", "expected"),
    [
        ([128] * 32, 8 * 512, 32),  # a burst of short prompts: one pass instead of four
        ([128] * 40, 8 * 512, 32),
        ([2048] * 9, 8 * 2048, 8),  # full chunks: mlx-lm's eight
        ([10, 10, 1000], 2000, 2),  # every row is padded to the longest chunk, the third would make it 3 x 1000
        ([1000, 10, 10], 2000, 2),
        ([5000, 10], 4096, 1),  # one prompt always goes, even a chunk over the budget
        ([], 4096, 1),
    ],
)
def test_prompts_that_fit_pad_every_row_to_the_longest_chunk(chunks: list[int], budget: int, expected: int) -> None:
    assert prompts_that_fit(chunks, budget) == expected
