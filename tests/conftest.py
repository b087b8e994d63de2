import pytest
import torch

from helpers_data import write_image_tree


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A small class-folder dataset of generated images."""
    return write_image_tree(tmp_path_factory.mktemp("data") / "tree")


def random_state_dict(model: torch.nn.Module, scale: float = 0.05) -> dict:
    """Non-trivial weights (the reference init zeroes the head, which would hide head mismatches)."""
    g = torch.Generator().manual_seed(1)
    sd = {k: (torch.randn(v.shape, generator=g) * scale if v.dtype.is_floating_point else v)
          for k, v in model.state_dict().items()}
    return {k: v.abs() + 1 if k.endswith("running_var") else v for k, v in sd.items()}  # a variance is positive


def smallest_input(model) -> tuple[int, int]:
    """The cheapest valid input size: the fixed size for token-count-bound models, else twice the stride."""
    if getattr(model, "fixed_input_size", False):
        return tuple(model.cfg.img_size)
    return (2 * model.stride, 2 * model.stride)
