"""The client keeps a session's padding mask and sends only the new tokens' part, whatever mask the caller
passes (transformers versions slice the mask they hand to ``forward`` differently)."""

from __future__ import annotations

import pytest
import torch

from client.model import new_tokens_mask

pytestmark = pytest.mark.timeout(30)


def test_the_new_columns_are_taken_from_a_full_or_a_new_tokens_mask():
    full = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    held = full[:, :3].bool()
    assert new_tokens_mask(full, past=3, tokens=2, held=held).tolist() == [[True, False], [True, True]]
    assert new_tokens_mask(full[:, 3:], past=3, tokens=2, held=held).tolist() == [[True, False], [True, True]]
    assert new_tokens_mask(None, past=3, tokens=2) is None


@pytest.mark.parametrize("shape", [(2, 4), (2, 6), (2, 1, 5, 5)])
def test_masks_of_another_length_are_refused(shape):
    with pytest.raises(ValueError, match="attention_mask"):
        new_tokens_mask(torch.ones(shape), past=3, tokens=2)


def test_a_mask_that_rewrites_the_held_padding_is_refused():
    held = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="already holds"):
        new_tokens_mask(torch.tensor([[1, 0, 1, 1]]), past=3, tokens=1, held=held)
