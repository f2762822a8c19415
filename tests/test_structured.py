"""SeReNe: neuron sensitivity against finite differences, the neuron regularizer, neuron pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressor.masks import Masks, prunable_parameters
from compressor import methods
from compressor.errors import CompressError
from compressor.methods import PruningConfig, make
from compressor.structured import AVERAGE_DECAY, NeuronPruner, NeuronSensitivity, SeReNe, find_neurons
from compressor.train import Trainer, TrainConfig


class TinyMLP(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5) if bn else nn.Identity()
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x))))


class TinyConv(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.act = nn.Tanh()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.act(self.bn(self.conv(x)))))


CASES = [
    pytest.param(TinyMLP, False, (4,), id="linear"),
    pytest.param(TinyMLP, True, (4,), id="linear-bn"),
    pytest.param(TinyConv, False, (2, 3, 3), id="conv"),
    pytest.param(TinyConv, True, (2, 3, 3), id="conv-bn"),
]


def _build(cls, bn: bool) -> nn.Module:
    torch.manual_seed(0)
    model = cls(bn).double()
    if bn:
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
            model.bn.weight.uniform_(0.5, 1.5)
    return model.eval()  # eval: BatchNorm acts per sample, so finite differences are per sample


def _finite_difference(model: nn.Module, probe: nn.Module, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """S_n by perturbing each pre-activation entry of each sample in turn."""
    eps = 1e-6
    base = model(x)
    batch, classes = base.shape
    probe_output = None

    def capture(module, args, out):
        nonlocal probe_output
        probe_output = out

    h = probe.register_forward_hook(capture)
    model(x)
    h.remove()
    channels = probe_output.shape[1]
    spatial = probe_output[0, 0].numel()
    sens = torch.zeros(channels, dtype=torch.float64)
    for n in range(channels):
        total = 0.0
        for b in range(batch):
            for pos in range(spatial):
                def bump(module, args, out, b=b, pos=pos, n=n):
                    out = out.clone()
                    out[b, n].view(-1)[pos] += eps
                    return out

                h = probe.register_forward_hook(bump)
                with torch.no_grad():
                    diff = (model(x)[b] - base[b]) / eps
                h.remove()
                total += float(diff.abs().sum() if exact else diff.sum().abs())
        sens[n] = total / (batch * spatial) / classes
    return sens


@pytest.mark.parametrize("cls,bn,shape", CASES)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bound"])
def test_neuron_sensitivity_matches_finite_differences(cls, bn: bool, shape, exact: bool) -> None:
    model = _build(cls, bn)
    x = torch.randn(3, *shape, dtype=torch.float64)
    neurons = find_neurons(model, x[:2])
    assert neurons.count == (5 if cls is TinyMLP else 4)  # the logits layer is not prunable
    probe_name = dict(neurons.probes)
    probe = model.bn if bn else (model.fc1 if cls is TinyMLP else model.conv)
    assert (("bn" if bn else ("fc1" if cls is TinyMLP else "conv")) in probe_name)
    sens = NeuronSensitivity(model, neurons, exact=exact)
    computed = sens.compute(model(x)).double()
    sens.remove()
    expected = _finite_difference(model, probe, x, exact)
    torch.testing.assert_close(computed, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cls,bn,shape", CASES)
def test_bound_never_exceeds_exact(cls, bn: bool, shape) -> None:
    model = _build(cls, bn).train()
    x = torch.randn(8, *shape, dtype=torch.float64)
    neurons = find_neurons(model, x[:2])
    exact, bound = NeuronSensitivity(model, neurons, exact=True), NeuronSensitivity(model, neurons, exact=False)
    out = model(x)
    s_exact, s_bound = exact.compute(out), bound.compute(out)
    assert torch.all(s_bound <= s_exact + 1e-12)
    assert torch.any(s_bound < s_exact - 1e-9)


def test_neuron_cut_off_from_the_logits_has_zero_sensitivity_and_shrinks() -> None:
    torch.manual_seed(0)
    model = TinyMLP(bn=False)
    with torch.no_grad():
        model.fc2.weight[:, 2] = 0.0  # hidden neuron 2 no longer reaches the outputs
    x = torch.randn(6, 4)
    neurons = find_neurons(model, x[:2])
    reg = SeReNe(model, neurons, lmbda=0.1)
    before_w, before_b = model.fc1.weight[2].clone(), model.fc1.bias[2].clone()
    out = model(x)
    reg.observe(out)
    assert reg.last[2] == 0 and torch.all(reg.last[[0, 1, 3, 4]] > 0)
    reg.step()
    torch.testing.assert_close(model.fc1.weight[2], before_w * 0.9)
    torch.testing.assert_close(model.fc1.bias[2], before_b * 0.9)


def test_regularizer_shrinks_every_parameter_of_a_neuron_together() -> None:
    model = _build(TinyConv, True).float().train()
    x = torch.randn(4, 2, 3, 3)
    neurons = find_neurons(model, x[:2])
    reg = SeReNe(model, neurons, lmbda=0.5)
    reg.observe(model(x))
    factor = 1 - 0.5 * (1 - reg.last).clamp(min=0)
    consumer = model.fc.weight.detach().clone()
    expected = {name: p.detach().clone() for name, p in [("conv.weight", model.conv.weight), ("conv.bias", model.conv.bias),
                                                         ("bn.weight", model.bn.weight), ("bn.bias", model.bn.bias)]}
    reg.step()
    for name, value in expected.items():
        p = dict(model.named_parameters())[name]
        torch.testing.assert_close(p.detach(), value * factor.view(-1, *([1] * (p.dim() - 1))), msg=name)
    # the consumer's input weights do not belong to the neuron: untouched
    assert torch.equal(model.fc.weight.detach(), consumer)


def test_sensitivity_ranking_uses_the_running_mean_not_the_last_batch() -> None:
    torch.manual_seed(0)
    model = TinyMLP(bn=False)
    neurons = find_neurons(model, torch.randn(2, 4))
    reg = SeReNe(model, neurons, lmbda=0.0)
    batches = [torch.randn(8, 4) for _ in range(5)]
    seen = []
    for x in batches:
        reg.observe(model(x))
        seen.append(reg.last.clone())
    expected = seen[0]
    for s in seen[1:]:
        expected = expected * AVERAGE_DECAY + s * (1 - AVERAGE_DECAY)
    torch.testing.assert_close(reg.average, expected)
    assert not torch.allclose(reg.average, reg.last)
    pruner = NeuronPruner(neurons, Masks(prunable_parameters(model)), sensitivity=reg)
    torch.testing.assert_close(pruner.scores(), expected)
    pruner.rank()
    pruner.prune_first(1, permanent=True)
    assert pruner.alive.tolist().index(False) == int(expected.argmin())


def test_pruned_neurons_stay_zero_through_training(synthetic) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    import models

    model = models.build("lenet300", data.input_shape, data.num_classes)
    masks = Masks(prunable_parameters(model))
    neurons = find_neurons(model, data.train.x[:2])
    reg = SeReNe(model, neurons, lmbda=1e-2, masks=masks)
    pruner = NeuronPruner(neurons, masks)
    pruner.rank()
    pruner.prune_first(50, permanent=True)
    dead = (~pruner.alive).nonzero().flatten().tolist()
    assert len(dead) == 50
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        idx = torch.randint(0, len(data.train), (16,))
        opt.zero_grad()
        out = model(data.train.x[idx])
        reg.observe(out)
        nn.functional.cross_entropy(out, data.train.y[idx]).backward()
        opt.step()
        reg.step()
    for name, p, owner in neurons.rows:
        rows = torch.isin(owner, torch.tensor(dead))
        assert torch.all(p.detach()[rows] == 0), name
    assert pruner.alive_from_masks().tolist() == pruner.alive.tolist()


def test_min_width_keeps_every_layer_alive(synthetic) -> None:
    data = synthetic(n=32)
    import models

    model = models.build("lenet300", data.input_shape, data.num_classes)
    masks = Masks(prunable_parameters(model))
    pruner = NeuronPruner(find_neurons(model, data.train.x[:2]), masks, min_width=3)
    n = pruner.rank()
    assert n == 300 + 100 - 2 * 3
    pruner.prune_first(n, permanent=True)
    assert pruner.remaining_per_layer() == {"fc1": 3, "fc2": 3}


@pytest.mark.parametrize("criterion, per_mac", [
    pytest.param("norm", False, id="norm"),
    pytest.param("sensitivity", False, id="sensitivity"),
    pytest.param("both", False, id="both"),
    pytest.param("norm", True, id="norm-per-mac"),
])
def test_serene_plugin_prunes_whole_neurons(synthetic, criterion: str, per_mac: bool) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    import models

    model = models.build("lenet300", data.input_shape, data.num_classes)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, neuron_criterion=criterion,
                           rank_per_mac=per_mac)
    plugin = make("serene", config, data.train.x[:2])
    Trainer(model, data, TrainConfig(epochs=20, lr=0.05, batch_size=16), plugin=plugin, progress=False, log=lambda s: None).fit()
    remaining = plugin.pruner.remaining_per_layer()
    assert plugin.pruner.per_mac is per_mac
    # per MAC, on 8x8 digits an input feature (300 MACs) costs more than an fc1 neuron (164)
    assert sum(remaining.values()) < 400 + data.input_shape[-1] * data.input_shape[-2]
    # a pruned neuron is entirely zero: its weight row and bias
    dead = (model.fc1.weight == 0).all(1)
    assert torch.all(model.fc1.bias[dead] == 0) and int(dead.sum()) == 300 - remaining["fc1"]


def _searches(synthetic, monkeypatch, config: PruningConfig, epochs: int) -> list[tuple[bool, bool, float, float]]:
    """Train LeNet-300 with serene; per threshold search: (by sensitivity, per MAC, max loss, max error)."""
    data = synthetic(n=96)
    torch.manual_seed(0)
    import models

    calls = []
    real = methods.find_threshold

    def spy(pruner, evaluate, *, max_loss, max_error):
        calls.append((pruner.by_sensitivity is not None, pruner.per_mac, max_loss, max_error))
        return real(pruner, evaluate, max_loss=max_loss, max_error=max_error)

    monkeypatch.setattr(methods, "find_threshold", spy)
    model = models.build("lenet300", data.input_shape, data.num_classes)
    plugin = make("serene", config, data.train.x[:2])
    Trainer(model, data, TrainConfig(epochs=epochs, lr=0.05, batch_size=16), plugin=plugin, progress=False, log=lambda s: None).fit()
    return calls


def test_both_criteria_search_by_sensitivity_then_by_norm_within_the_same_bounds(synthetic, monkeypatch) -> None:
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, neuron_criterion="both")
    calls = _searches(synthetic, monkeypatch, config, epochs=6)
    assert len(calls) >= 2 and len(calls) % 2 == 0
    assert [by_sensitivity for by_sensitivity, _, _, _ in calls] == [True, False] * (len(calls) // 2)
    for first, second in zip(calls[::2], calls[1::2]):
        assert first[2:] == second[2:]  # one plateau: both searches bounded by the same loss and error


def test_per_mac_ranking_is_followed_by_the_plain_one_within_the_same_bounds(synthetic, monkeypatch) -> None:
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, neuron_criterion="both", rank_per_mac=True)
    calls = _searches(synthetic, monkeypatch, config, epochs=8)
    assert len(calls) >= 4 and len(calls) % 4 == 0
    order = [(True, True), (True, False), (False, True), (False, False)]
    assert [c[:2] for c in calls] == order * (len(calls) // 4)
    for plateau in range(0, len(calls), 4):
        assert len({c[2] for c in calls[plateau:plateau + 4]}) == 1  # one bound per plateau


def test_unknown_neuron_criterion_is_a_clear_error() -> None:
    with pytest.raises(CompressError, match="--neuron-criterion must be one of norm, sensitivity, both"):
        PruningConfig(neuron_criterion="rms").validate()


# -- input features as units ---------------------------------------------------------------------


class FlatMLP(nn.Module):
    """Image input flattened straight into a Linear, as LeNet-300 does."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flat(x))))


def _input_gate_finite_difference(model: nn.Module, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """dy/dg_j for the input gate x_j -> (1 + g_j) x_j, by perturbing g_j per sample."""
    eps = 1e-6
    with torch.no_grad():
        base = model(x)
    flat = x.reshape(x.shape[0], -1)
    sens = torch.zeros(flat.shape[1], dtype=torch.float64)
    for j in range(flat.shape[1]):
        bumped = flat.clone()
        bumped[:, j] *= 1 + eps
        with torch.no_grad():
            diff = (model(bumped.reshape(x.shape)) - base) / eps
        per_sample = diff.abs().sum(1) if exact else diff.sum(1).abs()
        sens[j] = per_sample.mean() / base.shape[1]
    return sens


@pytest.mark.parametrize("cls, shape", [pytest.param(TinyMLP, (4,), id="2d-input"), pytest.param(FlatMLP, (2, 3), id="flattened")])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "bound"])
def test_input_unit_sensitivity_matches_finite_differences(cls, shape, exact: bool) -> None:
    torch.manual_seed(0)
    model = (cls(False) if cls is TinyMLP else cls()).double().eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    x[:, 0] = 0  # a feature that is always zero: its gate does nothing
    neurons = find_neurons(model, x[:2], inputs=True)
    features = int(torch.tensor(shape).prod())
    assert neurons.count == 5 + features and neurons.input_layer == "fc1"
    sens = NeuronSensitivity(model, neurons, exact=exact)
    computed = sens.compute(model(x)).double()[5:]
    sens.remove()
    torch.testing.assert_close(computed, _input_gate_finite_difference(model, x, exact), rtol=1e-4, atol=1e-7)
    assert computed[0] == 0


def test_input_units_only_where_the_input_goes_into_a_linear() -> None:
    model = _build(TinyConv, False)
    neurons = find_neurons(model, torch.randn(2, 2, 3, 3, dtype=torch.float64), inputs=True)
    assert neurons.columns == [] and neurons.input_layer is None and neurons.count == 4


def test_pruned_input_units_zero_their_columns_and_shrink_skips_them(synthetic) -> None:
    import models
    from compressor.shrink import shrink

    data = synthetic(n=32)
    torch.manual_seed(0)
    model = models.build("lenet300", data.input_shape, data.num_classes).eval()
    masks = Masks(prunable_parameters(model))
    neurons = find_neurons(model, data.train.x[:2], inputs=True)
    features = model.fc1.in_features
    pruner = NeuronPruner(neurons, masks)
    with torch.no_grad():  # make three input columns and two fc1 neurons the smallest units
        model.fc1.weight[:, [1, 7, 9]] *= 1e-3
        model.fc1.weight[[4, 8]] *= 1e-3
    pruner.rank()
    pruner.prune_first(5, permanent=True)
    assert pruner.remaining_per_layer() == {"fc1": 298, "fc2": 100, "input features": features - 3}
    assert torch.all(model.fc1.weight[:, [1, 7, 9]] == 0) and torch.all(model.fc1.weight[[4, 8]] == 0)
    assert pruner.alive_from_masks().tolist() == pruner.alive.tolist()
    result = shrink(model, data.test.x[:2])
    assert result.model.fc1.weight.shape == (298, features - 3)
    with torch.no_grad():
        torch.testing.assert_close(result.model(data.test.x[:8]), model(data.test.x[:8]), rtol=1e-4, atol=1e-5)


def test_rescaled_sensitivity_spares_each_layers_most_sensitive_live_neuron() -> None:
    torch.manual_seed(0)
    model = SmallTwoLayer()
    neurons = find_neurons(model, torch.randn(2, 4))
    reg = SeReNe(model, neurons, lmbda=0.5, rescale=True)
    reg.observe(model(torch.randn(8, 4)))
    sens = reg.last.clone()
    layers = neurons.layer_of_each()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    reg.step()
    for name in ("fc1", "fc2"):
        idx = layers[name]
        top = int(idx[sens[idx].argmax()])
        rows = dict(model.named_parameters())[f"{name}.weight"]
        local = top - int(idx[0])
        torch.testing.assert_close(rows[local], before[f"{name}.weight"][local])  # factor exactly 1
        expected = 1 - 0.5 * (1 - sens[idx] / sens[idx].max())
        torch.testing.assert_close(rows.detach(), before[f"{name}.weight"] * expected[:, None])
    # a pruned neuron that still looks sensitive does not set its layer's scale
    idx = layers["fc1"]
    top = int(idx[sens[idx].argmax()])
    reg.alive = torch.ones(neurons.count, dtype=torch.bool)
    reg.alive[top] = False
    scaled = reg._rescaled(sens)
    rest = idx[idx != top]
    assert scaled[rest].max() == 1.0 and scaled[top] > 1.0


class SmallTwoLayer(nn.Module):
    """Two hidden Linear layers of different widths (the logits are not units)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


# -- ranking per multiply-accumulate -----------------------------------------------------------


def _kill(neurons, dead: list[int]) -> None:
    """Zero everything the ``dead`` neurons own, as pruning does."""
    dead_t = torch.tensor(dead, dtype=torch.long)
    with torch.no_grad():
        for _, p, owner in neurons.rows:
            p[torch.isin(owner, dead_t)] = 0
        for _, p, owner in neurons.columns:
            p[:, torch.isin(owner, dead_t)] = 0


def _macs_after_removal(model: nn.Module, shape: tuple[int, ...]) -> int:
    from compressor.shrink import shrink
    from exporters.footprint import count_macs

    return count_macs(shrink(model, torch.randn(2, *shape)).model, shape)


class ResidualDepthwise(nn.Module):
    """A residual add (coupled group), BatchNorm, a depthwise conv passing channels on, and a
    Flatten into a Linear: every way a neuron's removal reaches other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5 * 4 * 4, 7)
        self.out = nn.Linear(7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b(torch.relu(self.bn_a(self.a(h)))))
        h = nn.functional.max_pool2d(torch.relu(self.pw(torch.relu(self.dw(h)))), 2)
        return self.out(torch.relu(self.fc(h.flatten(1))))


@pytest.mark.parametrize("arch, shape, inputs", [
    pytest.param("lenet300", (1, 28, 28), True, id="lenet300-with-input-units"),
    pytest.param("lenet5", (1, 28, 28), False, id="lenet5-flatten-into-linear"),
    pytest.param(ResidualDepthwise, (3, 8, 8), False, id="residual-depthwise-bn"),
])
def test_neuron_macs_is_what_physical_removal_saves(arch, shape, inputs: bool) -> None:
    import models
    from compressor.structured import neuron_macs

    torch.manual_seed(0)
    model = (models.build(arch, shape, 10) if isinstance(arch, str) else arch()).eval()
    neurons = find_neurons(model, torch.randn(2, *shape), inputs=inputs)
    gen = torch.Generator().manual_seed(1)
    alive = torch.ones(neurons.count, dtype=torch.bool)
    layer_of_each = neurons.layer_of_each()
    for n in torch.randperm(neurons.count, generator=gen)[: neurons.count // 3].tolist():
        # keep every layer alive: physical removal of a whole layer is not what is measured here
        if all(int(alive[layer_of_each[name]].sum()) > 2 for name in neurons.layers[n]):
            alive[n] = False
    _kill(neurons, torch.nonzero(~alive).flatten().tolist())
    cost = neuron_macs(neurons, alive)
    before = _macs_after_removal(model, shape)
    candidates = torch.nonzero(alive).flatten()
    if candidates.numel() > 40:  # a sample of the big models; every neuron of the small one
        candidates = candidates[torch.randperm(candidates.numel(), generator=gen)[:4]]
    for n in candidates.tolist():
        trial = copy.deepcopy(model)
        trial_neurons = find_neurons(trial, torch.randn(2, *shape), inputs=inputs)
        _kill(trial_neurons, [n])
        saved = before - _macs_after_removal(trial, shape)
        assert cost[n].item() == pytest.approx(saved, rel=1e-9), (n, neurons.layers[n])


def test_ranking_per_mac_prunes_the_expensive_neuron_of_equal_norm_first() -> None:
    class TwoBranches(nn.Module):
        """conv feeds a wide conv; fc is a cheap hidden Linear."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.wide = nn.Conv2d(2, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 6 * 6, 2)
            self.out = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.wide(torch.relu(self.conv(x)))).flatten(1)
            return self.out(torch.relu(self.fc(h)))

    model = TwoBranches()
    with torch.no_grad():  # every neuron's parameters get the same L2 norm
        for _, p in prunable_parameters(model):
            p.fill_(1.0)
        for m in (model.conv, model.wide, model.fc):
            m.weight.div_(m.weight[0].numel() ** 0.5)
            m.bias.zero_()
    x = torch.randn(2, 1, 6, 6)
    neurons = find_neurons(model, x)
    masks = Masks(prunable_parameters(model))
    by_norm = NeuronPruner(neurons, masks)
    per_mac = NeuronPruner(neurons, masks, per_mac=True)
    by_norm.rank(), per_mac.rank()
    first = per_mac._order[0]
    assert neurons.layers[first] == ("conv",)  # 2 inputs of 8 filters x 36 positions: the dearest
    assert torch.allclose(by_norm.scores()[0], by_norm.scores())  # by norm alone they all tie
    assert per_mac.scores()[first] < per_mac.scores()[neurons.layers.index(("fc",))]


# -- width alignment -------------------------------------------------------------------------------


class NineAndNineteen(nn.Module):
    """conv1 of 10 channels into conv2 of 19 into a hidden Linear of 5: widths off multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 3)
        self.conv2 = nn.Conv2d(10, 19, 3)
        self.fc = nn.Linear(19 * 2 * 2, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.out(torch.relu(self.fc(h.flatten(1))))


def _aligned_setup(min_width: int = 1):
    torch.manual_seed(0)
    model = NineAndNineteen()
    neurons = find_neurons(model, torch.randn(2, 1, 6, 6))
    return model, neurons, NeuronPruner(neurons, Masks(prunable_parameters(model)), min_width=min_width)


def test_misaligned_lists_each_layers_excess_dearest_first() -> None:
    _, _, pruner = _aligned_setup()
    # conv1's 2 extra channels save 2 x (16 x 9 own + 4 x 9 x 19 in conv2) = 1656 MACs, conv2's 3
    # save 3 x (4 x 9 x 10 own + 4 x 5 in fc) = 1140; fc (5) is below one block
    assert pruner.misaligned(8) == [("conv1", 2), ("conv2", 3)]
    assert pruner.misaligned(5) == [("conv2", 4)]  # conv1's 10 and fc's 5 are multiples of 5
    _, _, narrow = _aligned_setup(min_width=10)
    assert narrow.misaligned(8) == [("conv2", 3)]  # conv1 may not go below 10


@pytest.mark.parametrize("accept, widths", [
    pytest.param(lambda dead: True, {"conv1": 8, "conv2": 16, "fc": 5}, id="all-accepted"),
    pytest.param(lambda dead: False, {"conv1": 10, "conv2": 19, "fc": 5}, id="all-rejected"),
    pytest.param(lambda dead: dead <= 2, {"conv1": 8, "conv2": 19, "fc": 5}, id="only-the-first"),
])
def test_align_widths_prunes_each_layers_weakest_excess_or_nothing(accept, widths) -> None:
    from compressor.thresholding import align_widths

    model, neurons, pruner = _aligned_setup()
    norms = pruner.scores()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate() -> tuple[float, float]:
        dead = sum(int((m.weight.flatten(1) == 0).all(1).sum()) for m in (model.conv1, model.conv2, model.fc))
        return (1.0, 0.0) if accept(dead) else (2.0, 0.0)

    pruned = align_widths(pruner, evaluate, 8, max_loss=1.5)
    assert pruner.remaining_per_layer() == widths
    assert pruned == 29 - widths["conv1"] - widths["conv2"]
    for name, idx in neurons.layer_of_each().items():
        gone = idx[~pruner.alive[idx]]
        kept = idx[pruner.alive[idx]]
        if gone.numel():  # the weakest of the layer went, all of what they own is zero
            assert norms[gone].max() <= norms[kept].min()
            layer = getattr(model, name)
            assert torch.all(layer.weight[gone - idx.min()] == 0) and torch.all(layer.bias[gone - idx.min()] == 0)
    # what was kept is exactly as before (rejected trials restored)
    for key, value in model.state_dict().items():
        zeroed = value == 0
        assert torch.equal(value[~zeroed], before[key][~zeroed])


def test_serene_aligns_widths_once_per_plateau_within_the_searches_bounds(synthetic, monkeypatch) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    import models

    searches, alignments, changed_widths = [], [], []
    real_search, real_align = methods.find_threshold, methods.align_widths

    def spy_search(pruner, evaluate, *, max_loss, max_error):
        searches.append((max_loss, max_error))
        return real_search(pruner, evaluate, max_loss=max_loss, max_error=max_error)

    def spy_align(pruner, evaluate, multiple, *, max_loss, max_error):
        alignments.append((len(searches), multiple, max_loss, max_error))
        before = pruner.remaining_per_layer()
        pruned = real_align(pruner, evaluate, multiple, max_loss=max_loss, max_error=max_error)
        after = pruner.remaining_per_layer()
        changed = {name: w for name, w in after.items() if w != before[name]}
        assert sum(before.values()) - sum(after.values()) == pruned
        changed_widths.extend(changed.values())
        return pruned

    monkeypatch.setattr(methods, "find_threshold", spy_search)
    monkeypatch.setattr(methods, "align_widths", spy_align)
    model = models.build("lenet300", data.input_shape, data.num_classes)
    config = PruningConfig(pwe=1, twt=0.5, max_error_increase=0.2, lmbda=1e-2, width_multiple=8)
    plugin = make("serene", config, data.train.x[:2])
    result = Trainer(model, data, TrainConfig(epochs=8, lr=0.05, batch_size=16), plugin=plugin, progress=False,
                     log=lambda s: None).fit()
    assert alignments and len(alignments) == len(searches)  # one search per plateau (norm), then one alignment
    for plateau, (searches_before, multiple, max_loss, max_error) in enumerate(alignments):
        assert searches_before == plateau + 1 and multiple == 8
        assert (max_loss, max_error) == searches[plateau]
    assert any(h.get("aligned") for h in result.history), "no plateau aligned any width on an easy problem"
    assert changed_widths and all(w % 8 == 0 for w in changed_widths)  # every layer it cut now sits on a multiple


def test_width_multiple_must_be_positive() -> None:
    with pytest.raises(CompressError, match="--width-multiple must be >= 1"):
        PruningConfig(width_multiple=0).validate()


def test_excess_marks_the_weakest_neurons_above_each_multiple() -> None:
    _, neurons, pruner = _aligned_setup()
    norms = pruner.scores()
    marked = pruner.excess(8)
    layer = neurons.layer_of_each()
    assert int(marked[layer["conv1"]].sum()) == 2 and int(marked[layer["conv2"]].sum()) == 3
    assert not marked[layer["fc"]].any()
    for name in ("conv1", "conv2"):
        idx = layer[name]
        assert norms[idx[marked[idx]]].max() <= norms[idx[~marked[idx]]].min()


def test_fading_neurons_shrink_at_the_boosted_rate_whatever_their_sensitivity() -> None:
    from compressor.structured import FADE_BOOST

    torch.manual_seed(0)
    model = TinyMLP(bn=False).double()
    neurons = find_neurons(model, torch.randn(2, 4, dtype=torch.float64))
    reg = SeReNe(model, neurons, lmbda=1e-2)
    reg.observe(model(torch.randn(8, 4, dtype=torch.float64)))
    sens = reg.last.clone()
    reg.fading = torch.tensor([True, False, False, False, True])
    before = model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone()
    reg.step()
    expected = torch.where(reg.fading, 1 - FADE_BOOST * 1e-2, 1 - 1e-2 * (1 - sens).clamp(min=0))
    torch.testing.assert_close(model.fc1.weight, before[0] * expected[:, None])
    torch.testing.assert_close(model.fc1.bias, before[1] * expected)
    restored = SeReNe(model, neurons, lmbda=1e-2)
    restored.load_state_dict(reg.state_dict())
    assert torch.equal(restored.fading, reg.fading)


def test_serene_phases_out_what_alignment_could_not_remove(synthetic) -> None:
    data = synthetic(n=96)
    torch.manual_seed(0)
    import models

    model = models.build("lenet300", data.input_shape, data.num_classes)
    # no tolerance at all: nothing can be pruned, so every misaligned layer's excess fades
    config = PruningConfig(pwe=1, twt=0.0, max_error_increase=0.0, lmbda=1e-2, width_multiple=16, stall_limit=100)
    plugin = make("serene", config, data.train.x[:2])
    result = Trainer(model, data, TrainConfig(epochs=8, lr=0.05, batch_size=16), plugin=plugin, progress=False,
                     log=lambda s: None).fit()
    fading = plugin.regularizer.fading
    assert fading is not None and torch.equal(fading, plugin.pruner.excess(16))
    widths = plugin.pruner.remaining_per_layer()
    assert widths == {"fc1": 300, "fc2": 100, "input features": 64}
    assert int(fading.sum()) == 12 + 4  # 300 -> 288, 100 -> 96; the 64 inputs are a multiple of 16
    assert any(h.get("fading") for h in result.history)
