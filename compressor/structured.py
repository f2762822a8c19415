"""Neurons as prunable units: SeReNe's neuron sensitivity, its regularizer, and neuron pruning.

A *neuron* is an output unit of a Linear layer or an output channel of a Conv layer, together
with everything coupled to it: the BatchNorm channel that follows, a depthwise conv that
passes the channel on, and, across residual adds, the channels of every branch that must go
together. The coupling comes from the dependency graph of :mod:`compressor.shrink`, so a
neuron pruned here is exactly a channel that physical removal can take out.

Optionally the model's *input features* are units too, where the input goes (flattened) straight
into a Linear: an input unit owns its weight column in that layer, and once the column is zero
physical removal makes the layer skip the feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import mean_across_ranks
from .masks import Masks, prunable_parameters
from .shrink import channel_groups, input_layer

_OWNING_ROLES = ("out", "dw", "bn")
INPUT_UNITS = "input features"  # the layer name input units count towards
AVERAGE_DECAY = 0.99  # of the running mean of sensitivities that neurons are ranked by
# Shrink rate of the neurons the width alignment phases out, in multiples of lambda: at the
# default lambda (1e-4) about 0.1 % per step, so a neuron loses most of its norm over a few
# thousand steps while training moves its work elsewhere.
FADE_BOOST = 10.0


@dataclass
class Neurons:
    """The prunable neurons of a model and the parameter rows each one owns."""

    count: int
    # (parameter name, parameter, neuron index of each row; -1 = row owned by no prunable neuron)
    rows: list[tuple[str, nn.Parameter, torch.Tensor]]
    # (module name, neuron index of each output channel) for the modules whose outputs are
    # the neurons' pre-activations
    probes: list[tuple[str, torch.Tensor]]
    # per neuron, the Linear/Conv layers whose width it counts towards
    layers: list[tuple[str, ...]]
    widths: dict[str, int] = field(default_factory=dict)
    # input units: (weight name, weight, unit index of each column) of the first Linear, and
    # that Linear's module name
    columns: list[tuple[str, nn.Parameter, torch.Tensor]] = field(default_factory=list)
    input_layer: str | None = None
    # per neuron, the Linear/Conv layers that read it as an input channel, and the depthwise
    # convs that pass it through: what removing it saves beyond its own rows (see neuron_macs)
    feeds: list[tuple[str, ...]] = field(default_factory=list)
    passes: list[tuple[str, ...]] = field(default_factory=list)
    # per Linear/Conv layer: (multiply-accumulates per sample at full width, output channels,
    # input channels), channels counted as the coupled groups count them
    layer_macs: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def layer_of_each(self) -> dict[str, torch.Tensor]:
        """Per layer, the indices of its neurons."""
        out: dict[str, list[int]] = {}
        for n, layer_names in enumerate(self.layers):
            for name in layer_names:
                out.setdefault(name, []).append(n)
        return {k: torch.tensor(v) for k, v in out.items()}


def find_neurons(model: nn.Module, example_input: torch.Tensor, *, inputs: bool = False) -> Neurons:
    """Trace ``model`` and list its prunable neurons (the logits are not prunable); with
    ``inputs``, also the input features where the input goes straight into a Linear."""
    modules = dict(model.named_modules())
    all_groups = channel_groups(model, example_input)
    in_channels: dict[str, int] = {}
    for group in all_groups:
        for name, role in group.members:
            if role == "in":
                in_channels[name] = in_channels.get(name, 0) + len(group.channels)
    groups = [g for g in all_groups if not g.pinned]
    row_owner: dict[str, torch.Tensor] = {}
    probe_owner: dict[str, torch.Tensor] = {}
    layers: list[tuple[str, ...]] = []
    feeds: list[tuple[str, ...]] = []
    passes: list[tuple[str, ...]] = []
    count = 0
    for group in groups:
        group_feeds = tuple(name for name, role in group.members if role == "in")
        group_passes = tuple(name for name, role in group.members if role == "dw")
        roles = [role for _, role in group.members]
        probe_roles = ("bn",) if "bn" in roles else ("out", "dw")
        for channel in group.channels:
            neuron = count
            count += 1
            layer_names = []
            for (name, role), index in zip(group.members, channel):
                if role not in _OWNING_ROLES:
                    continue
                module = modules[name]
                if name not in row_owner:
                    row_owner[name] = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
                row_owner[name][index] = neuron
                if role in probe_roles:
                    if name not in probe_owner:
                        probe_owner[name] = torch.full((module.weight.shape[0],), -1, dtype=torch.long)
                    probe_owner[name][index] = neuron
                if role == "out":
                    layer_names.append(name)
            layers.append(tuple(layer_names))
            feeds.append(group_feeds)
            passes.append(group_passes)
    rows = []
    for pname, p in prunable_parameters(model):
        module_name = pname.rsplit(".", 1)[0] if "." in pname else ""
        if module_name in row_owner:
            rows.append((pname, p, row_owner[module_name].to(p.device)))
    widths = {name: int((owner >= 0).sum()) for name, owner in row_owner.items() if name in {n for l in layers for n in l}}
    columns = []
    first = input_layer(model) if inputs else None
    if first is not None:
        weight = modules[first].weight
        features = weight.shape[1]
        columns.append((f"{first}.weight" if first else "weight", weight,
                        torch.arange(count, count + features, device=weight.device)))
        layers.extend([(INPUT_UNITS,)] * features)
        feeds.extend([(first,)] * features)
        passes.extend([()] * features)
        in_channels[first] = features  # input units are single features, not channels
        widths[INPUT_UNITS] = features
        count += features
    full = _layer_macs(model, example_input)
    layer_macs = {name: (macs, out, in_channels.get(name, 1)) for name, (macs, out) in full.items()}
    return Neurons(count, rows, list(probe_owner.items()), layers, widths, columns, first,
                   feeds, passes, layer_macs)


def _layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per Linear/Conv layer: multiply-accumulates per sample and output channels."""
    found: dict[str, tuple[int, int]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # every output element costs one row (Linear) or one filter (Conv) of the weight
            found[name] = (output[0].numel() * module.weight[0].numel(), module.weight.shape[0])
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


def neuron_macs(neurons: Neurons, alive: torch.Tensor) -> torch.Tensor:
    """Multiply-accumulates per sample that removing each neuron would save, given which
    neurons are ``alive``: its own rows (its output channel of every layer it belongs to, at
    the layer's current input width), its input channel of every layer that reads it (at that
    layer's current output width), and its channel of every depthwise conv that passes it on.

    Exact for plain chains and residual/concat groups; for grouped convs each channel is
    charged an equal share of the layer."""
    dead = ~alive.cpu()
    out_alive: dict[str, int] = {}
    in_alive: dict[str, int] = {}
    for name, (_, width_out, width_in) in neurons.layer_macs.items():
        out_alive[name] = width_out
        in_alive[name] = width_in
    for n in torch.nonzero(dead).flatten().tolist():
        for name in neurons.layers[n]:
            if name in out_alive:
                out_alive[name] -= 1
        for name in neurons.feeds[n]:
            in_alive[name] -= 1
    # Per layer, the MACs of one (output, input) channel pair at full width.
    per_pair = {name: macs / (w_out * w_in) for name, (macs, w_out, w_in) in neurons.layer_macs.items()}
    cost = torch.zeros(neurons.count, dtype=torch.float64)
    for n in range(neurons.count):
        total = 0.0
        for name in neurons.layers[n]:
            if name in per_pair:
                total += per_pair[name] * in_alive[name]
        for name in neurons.feeds[n]:
            total += per_pair[name] * out_alive[name]
        for name in neurons.passes[n]:
            total += neurons.layer_macs[name][0] / neurons.layer_macs[name][1]
        cost[n] = total
    return cost


class NeuronSensitivity:
    """Per-neuron output sensitivity, measured on the batch that is being trained on.

    S_n = (1/C) * sum_k E|dy_k/dz_n| (exact, C backward passes, batched) or the bound
    S_n = (1/C) * E|sum_k dy_k/dz_n| (one extra backward), where z_n is the neuron's
    pre-activation and E averages over the batch and spatial positions. Where a neuron has
    several pre-activations (coupled channels), the largest sensitivity counts.

    An input unit's sensitivity is that of a gate g_j = 1 on the feature, x_j -> g_j * x_j:
    dy/dg_j = x_j * dy/dx_j, so a feature that is always zero has sensitivity 0. It is computed
    from the first layer's pre-activation gradient (dy/dx = dy/dz @ W), at no extra backward.
    """

    def __init__(self, model: nn.Module, neurons: Neurons, *, exact: bool = False) -> None:
        self.neurons = neurons
        self.exact = exact
        modules = dict(model.named_modules())
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name, _ in neurons.probes]
        self._first: nn.Module | None = None
        self._first_io: tuple[torch.Tensor, torch.Tensor] | None = None
        if neurons.input_layer is not None:
            self._first = modules[neurons.input_layer]
            self._handles.append(self._first.register_forward_hook(self._store_first))

    def _store_first(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._first_io = (args[0], output)

    def _hook(self, name: str):
        def store(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                self._outputs[name] = output

        return store

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def compute(self, output: torch.Tensor) -> torch.Tensor:
        """Sensitivity of every neuron for the forward pass that produced ``output``."""
        names = [name for name, _ in self.neurons.probes if name in self._outputs]
        tensors = [self._outputs[name] for name in names]
        first_io, self._first_io = self._first_io, None
        if first_io is not None:
            tensors.append(first_io[1])
        classes = output.shape[1]
        if self.exact:
            eye = torch.eye(classes, device=output.device, dtype=output.dtype)
            grad_outputs = eye[:, None, :].expand(classes, *output.shape)
            try:
                grads = torch.autograd.grad(output, tensors, grad_outputs=grad_outputs, retain_graph=True, is_grads_batched=True)
            except RuntimeError:  # no batching rule for some op: one backward per class
                per_class = [torch.autograd.grad(output[:, k].sum(), tensors, retain_graph=True) for k in range(classes)]
                grads = tuple(torch.stack([pc[i] for pc in per_class]) for i in range(len(tensors)))
            # [C, B, channels, ...] -> mean |.| over batch and space, then sum over classes
            per_channel = [_class_sum_channel_mean_abs(g) for g in grads[: len(names)]]
        else:
            grads = torch.autograd.grad(output.sum(), tensors, retain_graph=True)
            per_channel = [_channel_mean_abs(g) for g in grads[: len(names)]]
        sens = torch.zeros(self.neurons.count, device=output.device, dtype=output.dtype)
        owners = dict(self.neurons.probes)
        for name, s in zip(names, per_channel):
            owner = owners[name].to(output.device)
            valid = owner >= 0
            sens.scatter_reduce_(0, owner[valid], s[valid] / classes, reduce="amax")
        if first_io is not None:
            x, weight = first_io[0].detach(), self._first.weight.detach()
            gate = (grads[-1].detach() @ weight) * x  # x_j * dy/dx_j: [B, ..., F], exact: [C, B, ..., F]
            s = gate.abs().flatten(1, -2).mean(1).sum(0) if self.exact else gate.abs().flatten(0, -2).mean(0)
            start = int(self.neurons.columns[0][2][0])
            sens[start:start + s.numel()] = s / classes
        self._outputs.clear()
        return sens


def _channel_mean_abs(g: torch.Tensor) -> torch.Tensor:
    """Mean |g| per channel (dim 1) over batch and spatial positions."""
    return g.abs().transpose(0, 1).flatten(1).mean(1)


def _class_sum_channel_mean_abs(g: torch.Tensor) -> torch.Tensor:
    """For per-class gradients [C, B, ch, ...]: sum over classes of the per-channel mean |g|."""
    return g.abs().transpose(1, 2).flatten(2).mean(2).sum(0)


class SeReNe:
    """SeReNe regularizer, optimizer-like::

        out = model(x); reg.observe(out); loss.backward(); optimizer.step(); reg.step()

    Every parameter row owned by neuron n (weight row or filter, bias, the following
    BatchNorm's scale and shift) is shrunk together:
    ``theta_n <- theta_n - lmbda * theta_n * max(0, 1 - S_n)``.

    With ``rescale``, S_n is first divided by the largest sensitivity among the live neurons of
    its layer. The paper's S is tiny for every neuron (far below 1), so unscaled, every neuron
    shrinks at nearly the full rate and the regularizer acts like weight decay; rescaled, a
    layer's most sensitive neuron is not shrunk at all and the others in proportion to how
    much less they matter. ``alive`` (set by the pruner) keeps pruned neurons, whose downstream
    weights still carry a gradient, out of the maximum.

    ``fading`` (set by the width alignment, per neuron) marks neurons to be phased out whatever
    their sensitivity: they shrink at ``FADE_BOOST * lmbda`` per step, so the network learns to
    do without them before a plateau tries to remove them.
    """

    def __init__(self, model: nn.Module, neurons: Neurons, lmbda: float, masks: Masks | None = None, *,
                 exact: bool = False, rescale: bool = False) -> None:
        self.neurons = neurons
        self.lmbda = lmbda
        self.masks = masks
        self.rescale = rescale
        self.alive: torch.Tensor | None = None
        self.fading: torch.Tensor | None = None
        names = sorted({layer[0] for layer in neurons.layers if layer})
        self._layer = torch.tensor([names.index(layer[0]) if layer else 0 for layer in neurons.layers], dtype=torch.long)
        self._layers = max(len(names), 1)
        self.sensitivity = NeuronSensitivity(model, neurons, exact=exact)
        self.last: torch.Tensor | None = None
        # Running mean over recent batches (about the last 100): one batch's sensitivity is too
        # noisy to rank neurons by.
        self.average: torch.Tensor | None = None

    def observe(self, output: torch.Tensor) -> None:
        self.last = self.sensitivity.compute(output)
        # Under torchrun: the mean of the ranks' batch means, so every rank shrinks alike.
        mean_across_ranks([self.last])
        current = self.last.detach()
        if self.average is None:
            self.average = current.clone()
        else:
            self.average.mul_(AVERAGE_DECAY).add_(current, alpha=1.0 - AVERAGE_DECAY)

    def remove_hooks(self) -> None:
        """Detach from the model (needed before tracing it, e.g. for physical removal)."""
        self.sensitivity.remove()

    @torch.no_grad()
    def step(self) -> None:
        if self.last is not None:
            sens = self._rescaled(self.last) if self.rescale else self.last
            shrink = self.lmbda * (1.0 - sens).clamp_(min=0.0)
            if self.fading is not None:
                shrink = torch.where(self.fading.to(shrink.device), FADE_BOOST * self.lmbda, shrink)
            for _, p, owner in self.neurons.rows:
                owner = owner.to(p.device)
                factor = torch.where(owner >= 0, 1.0 - shrink[owner.clamp(min=0)], 1.0)
                p.mul_(factor.view(-1, *([1] * (p.dim() - 1))))
            for _, p, owner in self.neurons.columns:
                p.mul_(1.0 - shrink[owner.to(p.device)])
        if self.masks is not None:
            self.masks.apply()

    def _rescaled(self, sens: torch.Tensor) -> torch.Tensor:
        """``sens`` divided by the largest live sensitivity of each neuron's layer."""
        layer = self._layer.to(sens.device)
        live = sens if self.alive is None else torch.where(self.alive.to(sens.device), sens, torch.zeros_like(sens))
        largest = torch.zeros(self._layers, device=sens.device, dtype=sens.dtype).scatter_reduce_(0, layer, live, reduce="amax")
        return sens / largest[layer].clamp_min(torch.finfo(sens.dtype).tiny)

    def state_dict(self) -> dict:
        return {"lmbda": self.lmbda, "average": None if self.average is None else self.average.detach().cpu().clone(),
                "fading": None if self.fading is None else self.fading.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.lmbda = float(state["lmbda"])
        average = state.get("average")
        self.average = None if average is None else average.clone()
        fading = state.get("fading")
        self.fading = None if fading is None else fading.clone()


class NeuronPruner:
    """Structured pruner: whole neurons, ranked by the L2 norm of the parameters they own
    (default; input units' columns scaled to the rows' initial norm) or by their recent mean
    sensitivity; keeps at least ``min_width`` neurons in every layer.

    The L2 norm is comparable across layers: PyTorch's default initialisation gives every
    weight row roughly the same norm whatever its fan-in, whereas the mean magnitude would
    favour pruning the widest layers first.

    With ``per_mac``, the criterion is divided by what removing the neuron saves
    (:func:`neuron_macs`, relative to the mean over live neurons), so the ranking asks which
    neuron costs the most computation per unit of importance: a conv channel that feeds a
    wide layer goes before a cheap fully connected neuron of the same norm."""

    def __init__(self, neurons: Neurons, masks: Masks, *, min_width: int = 1, sensitivity: "SeReNe | None" = None,
                 per_mac: bool = False) -> None:
        self.neurons = neurons
        self.masks = masks
        self.min_width = min_width
        self.by_sensitivity = sensitivity
        self.per_mac = per_mac
        self.alive = self.alive_from_masks()
        self._order: list[int] = []
        self._scores = torch.zeros(0)
        self._saved: dict[str, torch.Tensor] = {}

    def alive_from_masks(self) -> torch.Tensor:
        """A neuron is alive while any of its rows has a surviving entry."""
        alive_rows = torch.zeros(self.neurons.count, dtype=torch.long)
        for name, p, owner in self.neurons.rows:
            owner = owner.cpu()
            valid = owner >= 0
            rows_alive = self.masks.masks[name].reshape(p.shape[0], -1).any(1).cpu()
            alive_rows.index_add_(0, owner[valid], rows_alive[valid].long())
        for name, p, owner in self.neurons.columns:
            alive_rows.index_add_(0, owner.cpu(), self.masks.masks[name].any(0).cpu().long())
        return alive_rows > 0

    def scores(self) -> torch.Tensor:
        score = self._criterion()
        if not self.per_mac:
            return score
        cost = neuron_macs(self.neurons, self.alive)
        live = cost[self.alive]
        mean = float(live.mean()) if live.numel() else 1.0
        # A neuron that saves nothing (all its consumers gone) ranks by its criterion alone
        # divided by the smallest positive cost, never by a division by zero.
        floor = float(live[live > 0].min()) if bool((live > 0).any()) else 1.0
        return (score.double() * mean / cost.clamp_min(floor)).float()

    def _criterion(self) -> torch.Tensor:
        if self.by_sensitivity is not None and self.by_sensitivity.average is not None:
            return self.by_sensitivity.average.cpu()
        sq = torch.zeros(self.neurons.count, dtype=torch.float64)
        for _, p, owner in self.neurons.rows:
            owner = owner.cpu()
            valid = owner >= 0
            rows = p.detach().cpu().double().reshape(p.shape[0], -1)
            sq.index_add_(0, owner[valid], rows[valid].pow(2).sum(1))
        for _, p, owner in self.neurons.columns:
            # A column of an [out, in] weight has `out` entries against a row's `in`: scaled by
            # in/out (in squares), both have the same expected norm at PyTorch's initialisation,
            # so inputs are not pruned first just for having shorter columns.
            scale = p.shape[1] / p.shape[0]
            sq.index_add_(0, owner.cpu(), p.detach().cpu().double().pow(2).sum(0) * scale)
        return sq.sqrt().float()

    def rank(self) -> int:
        self._scores = self.scores()
        candidates = torch.nonzero(self.alive).flatten()
        order = candidates[torch.argsort(self._scores[candidates], stable=True)].tolist()
        return self._set_order(order)

    def _set_order(self, order: list[int], limit: int | None = None) -> int:
        """Make the prefix of ``order`` that no layer's minimum width forbids (at most ``limit``
        neurons) the ranking :meth:`prune_first` cuts from, and save the parameters to restore."""
        remaining = self.remaining_per_layer()
        self._order = []
        for n in order:
            if limit is not None and len(self._order) == limit:
                break
            layers = self.neurons.layers[n]
            if all(remaining[name] > self.min_width for name in layers):
                self._order.append(n)
                for name in layers:
                    remaining[name] -= 1
        self._saved = {name: p.detach().clone() for name, p in self._params().items()}
        return len(self._order)

    def _params(self) -> dict[str, nn.Parameter]:
        """Every parameter that some unit owns rows or columns of."""
        return {name: p for name, p, _ in self.neurons.rows + self.neurons.columns}

    def prune_first(self, k: int, *, permanent: bool) -> float:
        dead = self.alive.clone()
        dead[:] = False
        dead[self._order[:k]] = True
        keep = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self._params().items()}
        for name, p, owner in self.neurons.rows:
            owner_cpu = owner.cpu()
            row_dead = (owner_cpu >= 0) & dead[owner_cpu.clamp(min=0)]
            keep[name] &= (~row_dead).to(p.device).view(-1, *([1] * (p.dim() - 1)))
        for name, p, owner in self.neurons.columns:
            keep[name] &= ~dead[owner.cpu()].to(p.device)
        with torch.no_grad():
            for name, p in self._params().items():
                if permanent:
                    self.masks.masks[name] &= keep[name]
                p.copy_(self._saved[name] * keep[name])
        if permanent:
            self.alive &= ~dead
        return float(self._scores[self._order[k - 1]]) if k > 0 else 0.0

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self._params().items():
                p.copy_(self._saved[name])

    def pruned_count(self) -> int:
        return int((~self.alive).sum())

    def misaligned(self, multiple: int) -> list[tuple[str, int]]:
        """Layers whose live width is above ``multiple`` but not a multiple of it, with how many
        neurons would bring each down to the multiple below, most MACs saved first.

        Blocked CPU kernels (onnxruntime's NCHWc convolutions: blocks of 8 channels with AVX2,
        16 with AVX-512) compute a layer at its width rounded up to the block, and fall back to a
        plain kernel for inputs of more than one block that are not a whole number of blocks:
        one channel above a multiple can cost as much as a whole block."""
        cost = neuron_macs(self.neurons, self.alive)
        out = []
        for name, idx in self.neurons.layer_of_each().items():
            live = idx[self.alive[idx]]
            excess = len(live) % multiple
            if len(live) > multiple and excess and len(live) - excess >= self.min_width:
                out.append((float(cost[live].mean()) * excess, name, excess))
        return [(name, excess) for _, name, excess in sorted(out, key=lambda t: -t[0])]

    def _weakest_first(self, layer: str, scores: torch.Tensor) -> torch.Tensor:
        """The live neurons of ``layer``, weakest by ``scores`` first."""
        idx = self.neurons.layer_of_each()[layer]
        live = idx[self.alive[idx]]
        return live[torch.argsort(scores[live], stable=True)]

    def excess(self, multiple: int) -> torch.Tensor:
        """Per neuron: whether it is one of the weakest ``excess`` of a layer listed by
        :meth:`misaligned`, i.e. what would have to go for that layer to reach a multiple."""
        scores = self.scores()
        marked = torch.zeros(self.neurons.count, dtype=torch.bool)
        for layer, count in self.misaligned(multiple):
            marked[self._weakest_first(layer, scores)[:count]] = True
        return marked

    def rank_layer(self, layer: str, k: int) -> int:
        """Rank only the ``k`` weakest live neurons of ``layer`` (skipping any whose other
        layers are at their minimum width), for :meth:`prune_first`; returns how many."""
        self._scores = self.scores()
        return self._set_order(self._weakest_first(layer, self._scores).tolist(), limit=k)

    def remaining_per_layer(self) -> dict[str, int]:
        return {name: int(self.alive[idx].sum()) for name, idx in self.neurons.layer_of_each().items()}
