"""The one comparison of the kernel tests, with per-dtype tolerances."""

import torch

# (atol, rtol) by the lowest-precision dtype among an op's inputs. Inputs are scaled so results
# are O(1); these allow a few units in the last place of that dtype (both sides round, in a
# different order), while a wrong row, slot, column or scale is off by O(1).
TOLERANCES = {
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float32: (1e-4, 1e-4),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """The one comparison of this file, with the tolerance of `dtype`."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
