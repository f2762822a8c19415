"""Input features nobody reads: the model's first Linear can drop their weight columns.

A fully connected first layer (LeNet-300 on flattened pixels, an MLP on tabular features) often
ends up with whole input columns at zero, e.g. image borders that are always blank. Those
features cannot be removed from the model's *input* (its callers still pass them), but the
layer can stop reading them: a gather of the used features in front of a narrower Linear gives
exactly the same outputs with fewer MACs and parameters.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from ._ops import LINEAR_TYPES


class SelectFeatures(nn.Module):
    """Keeps the listed features (last dim, the one a Linear reads); exported as a Gather."""

    def __init__(self, index: Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("index", index.to(torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.index.numel()}"


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten of everything but the batch dimension."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if node.op == "call_function" and node.target is torch.flatten:
        return start == 1 and end == -1
    if node.op == "call_method" and node.target == "flatten":
        return start == 1 and end == -1
    return False


def input_linear(gm: fx.GraphModule) -> fx.Node | None:
    """The Linear node that reads the (flattened) model input and nothing else reads it.

    None when the model has several inputs, or the input goes anywhere but through flattening
    into one Linear (normalisation, a conv, a second consumer...)."""
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    node = placeholders[0]
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        (user,) = users
        if user.op == "call_module" and type(modules.get(str(user.target))) in LINEAR_TYPES:
            return user if user.args and user.args[0] is node and len(user.args) == 1 and not user.kwargs else None
        if not _is_flatten(user, modules) or user.args[0] is not node:
            return None
        node = user


def unread_input_features(gm: fx.GraphModule) -> Tensor | None:
    """Bool mask of the input features the first Linear reads through all-zero weights (None
    when the input does not go straight into one Linear)."""
    linear_node = input_linear(gm)
    return None if linear_node is None else _unread(gm, linear_node)


def _unread(gm: fx.GraphModule, linear_node: fx.Node) -> Tensor:
    return (gm.get_submodule(str(linear_node.target)).weight.detach() == 0).all(0)


def select_input_features(gm: fx.GraphModule) -> tuple[int, int] | None:
    """Make the first Linear skip input features whose weight column is all zero.

    Returns (features before, features read after), or None when nothing changed."""
    linear_node = input_linear(gm)
    if linear_node is None:
        return None
    linear = gm.get_submodule(str(linear_node.target))
    used = ~_unread(gm, linear_node)
    kept = int(used.sum())
    if kept in (0, used.numel()):  # nothing to gain, or a layer that reads nothing (keep it simple)
        return None
    index = torch.nonzero(used).flatten()
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = kept
    name = "select_input_features"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, SelectFeatures(index.to(linear.weight.device), used.numel()))
    with gm.graph.inserting_before(linear_node):
        select = gm.graph.call_module(name, (linear_node.args[0],))
    linear_node.replace_input_with(linear_node.args[0], select)
    return used.numel(), kept

