"""`exporters.footprint.interleaved_latency`: how the benchmarks time sessions against each other."""

from __future__ import annotations

import time

import numpy as np
import pytest

from exporters.footprint import interleaved_latency


class _Input:
    name = "x"


class _FakeSession:
    """Records every call in a shared log; each run takes ``seconds``."""

    def __init__(self, label: str, log: list[str], seconds: float = 0.0) -> None:
        self.label, self.log, self.seconds = label, log, seconds

    def get_inputs(self) -> list[_Input]:
        return [_Input()]

    def run(self, outputs: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert set(feeds) == {"x"}
        self.log.append(self.label)
        if self.seconds:
            time.sleep(self.seconds)
        return [feeds["x"]]


@pytest.mark.parametrize(("runs", "rounds"), [(10, 5), (7, 3), (2, 5), (1, 1)], ids=["even", "uneven", "few-runs", "one"])
def test_every_session_gets_its_runs_in_rotating_blocks(runs: int, rounds: int) -> None:
    log: list[str] = []
    sessions = [_FakeSession(label, log) for label in "abc"]
    interleaved_latency(sessions, np.zeros(1), warmup=2, runs=runs, rounds=rounds)
    used_rounds = min(rounds, runs)
    # warm-up, then per round and session one untimed run and its block of timed runs
    assert log[:6] == list("abcabc")
    assert [log.count(label) for label in "abc"] == [2 + used_rounds + runs] * 3
    blocks = []
    for label in log[6:]:
        if blocks and blocks[-1][0] == label:
            blocks[-1][1] += 1
        else:
            blocks.append([label, 1])
    assert len(blocks) == 3 * used_rounds  # one block per session per round, never split
    firsts = [blocks[3 * r][0] for r in range(used_rounds)]
    assert firsts == ["abc"[r % 3] for r in range(used_rounds)]  # the order rotates


def test_medians_follow_each_sessions_own_cost() -> None:
    log: list[str] = []
    fast, slow = _FakeSession("fast", log, 0.001), _FakeSession("slow", log, 0.004)
    t_fast, t_slow = interleaved_latency([fast, slow], np.zeros(1), warmup=1, runs=6, rounds=2)
    assert 0.001 <= t_fast < t_slow
    assert t_slow >= 0.004
