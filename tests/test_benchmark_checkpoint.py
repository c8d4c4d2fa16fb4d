"""benchmarks/checkpoint_async.py runs (tiny) and its savers write the checkpoints it times."""

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_checkpoint_async_row(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import checkpoint_async

    row = checkpoint_async.measure("lenet300", "rigl", steps=3, every=1, rounds=1,
                                   batch_size=4, model_options={"width": 0.05})
    assert row["every"] == 1 and row["saves_per_round"] == 2 and row["state_bytes"] > 0
    for variant in ("none", "sync", "async"):
        assert row[f"{variant}_ms_per_step"] > 0
    # 2 compile steps, then per variant a round of 3 steps saving after its first two;
    # each saver keeps its last 2 (max_to_keep=2): sync saved steps 6, 7, async 9, 10
    assert row["committed_steps"] == {"sync": [6, 7], "async": [9, 10]}
