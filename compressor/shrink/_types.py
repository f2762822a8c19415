"""Public result types and the error of :mod:`compressor.shrink`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import CompressError


class UnsupportedModel(CompressError):
    """The model cannot be shrunk safely: untraceable, or it uses an op shrink does not know."""


@dataclass
class LayerChange:
    """One row of the plan: a layer's weight shape before and after shrinking.

    ``after == ()`` means the layer is gone (all its channels removed, or a BatchNorm fused
    into the layer before it).
    """

    name: str
    kind: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    params_before: int = 0
    params_after: int = 0


@dataclass
class ShrinkResult:
    """The shrunk model, what changed, and why some dead channels were kept."""

    model: nn.Module
    plan: list[LayerChange]
    params_before: int
    params_after: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        changed = [c for c in self.plan if c.before != c.after or c.params_before != c.params_after]
        rows = [("layer", "kind", "before", "after", "params removed")]
        for c in changed:
            rows.append((c.name, c.kind, _fmt_shape(c.before), _fmt_shape(c.after) if c.after else "removed",
                         f"{c.params_before - c.params_after:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(
                (s.rjust(w) if j == 4 else s.ljust(w)) for j, (s, w) in enumerate(zip(r, widths))
            ).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        unchanged = len(self.plan) - len(changed)
        if unchanged:
            lines.append(f"({unchanged} layer{'s' if unchanged != 1 else ''} unchanged)")
        removed = self.params_before - self.params_after
        pct = 100.0 * removed / self.params_before if self.params_before else 0.0
        lines.append(
            f"params: {self.params_before:,} -> {self.params_after:,} "
            f"({removed:,} removed, {pct:.1f} %)"
        )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


@dataclass
class ChannelGroup:
    """Channels that can only be removed together (one coupled group of the dependency graph).

    ``members`` lists (module name, role) pairs; role is ``"out"`` (output channel of a
    Linear/Conv: weight row/filter and bias), ``"dw"`` (a depthwise conv's filter, which
    passes the channel through), ``"bn"`` (BatchNorm / per-channel PReLU entry) or ``"in"``
    (input channel of a consuming Linear/Conv; for a Linear after Flatten this is the channel
    index, covering a block of features). ``channels[i][j]`` is the index of coupled channel i
    in member j. ``pinned`` groups (model input/output, shape reads) cannot shrink.
    """

    members: list[tuple[str, str]]
    channels: list[tuple[int, ...]]
    pinned: bool

def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "-"
