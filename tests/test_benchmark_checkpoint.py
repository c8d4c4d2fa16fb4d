"""benchmarks/checkpoint_async.py runs (tiny) and its row adds up."""

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
    cost = (row["sync_ms_per_step"] - row["none_ms_per_step"]) * 3 / 2  # x steps / saves
    assert abs(row["sync_save_ms"] - cost) < 0.06
