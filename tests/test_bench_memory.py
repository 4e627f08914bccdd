"""bench.memory_plan: XLA's plan of our step, for abstract inputs, agrees with the state's size
counted from the model's shapes, and donation moves the new state into the old one's buffers."""

from bench.common import SIZES
from bench.memory_plan import plan

TINY = dict(SIZES["small"], vocab_size=50, hidden_size=32, intermediate_size=64, num_heads=2)


def test_plan_counts_the_state_from_the_shapes():
    result = plan(TINY, relations=3, batch=2, length=8, donate=False)
    # 2 masked layers x (4 * 32 * 32 + 2 * 32 * 64) weights x 3 relations x 3 arrays x 4 bytes,
    # and Adam's int32 update count per relation.
    assert result["state"] == 2 * 8192 * 3 * 3 * 4 + 3 * 4
    # jit drops the arguments the step never reads (the frozen layers below the masked ones).
    batch_bytes = 3 * 2 * 8 * (32 * 4 + 2 * 4) + 3 * 2 * 3 * 4
    assert result["state"] < result["arguments"] <= (result["state"] + result["frozen_params"]
                                                      + batch_bytes)
    assert result["outputs"] >= result["state"]
    assert result["reused"] == 0
    assert result["peak"] == (result["arguments"] + result["outputs"] + result["temporaries"])


def test_donation_reuses_the_state_buffers():
    result = plan(TINY, relations=3, batch=2, length=8, donate=True)
    assert result["reused"] >= result["state"]
