"""KVCache invariants: sink, eviction order, pointers, recompute protection, read-only plans."""
from __future__ import annotations

import torch

from memflow.kv_cache import KVCache

FL = 2  # tokens per frame in these unit tests


def _cache(cap_frames=12, sink_frames=3, max_frames=None):
    return KVCache(
        num_layers=1, batch_size=1, capacity=cap_frames * FL, sink_tokens=sink_frames * FL,
        max_attention_tokens=(max_frames or cap_frames) * FL, num_heads=1, head_dim=1,
    )


def _frames(start, n):
    """K/V whose every token carries its absolute frame index."""
    idx = torch.arange(start, start + n, dtype=torch.float32).repeat_interleave(FL)
    return idx.view(1, -1, 1, 1).clone()


def _buffer_frames(cache):
    return cache.k[0][0, : cache.fill : FL, 0, 0].tolist()


def _sink_and_window(cache, plan, new):
    """The sink and window keys of layer 0 as one call would attend them."""
    s, w = cache.sink_context(0, plan), cache.window_context(0, plan)
    sink = torch.cat([*s.k, new[:, s.new], *s.k_tail], dim=1)
    window = torch.cat([*w.k, new[:, w.new]], dim=1)
    return sink, window


def _commit(cache, start, n):
    plan = cache.plan(start * FL, n * FL)
    kv = _frames(start, n)
    cache.commit_layer(0, plan, kv, kv)
    cache.advance(plan)
    return plan


def test_pointer_table_and_eviction_order():
    """Released geometry: (G, E) in frames = (3,3), (6,6), (9,9), (12,12), (15,12), (18,12), ...
    and the buffer holds the sink then the newest frames in order."""
    cache = _cache()
    expected = [(3, 3), (6, 6), (9, 9), (12, 12), (15, 12), (18, 12), (21, 12)]
    for n, (g, e) in enumerate(expected):
        plan = _commit(cache, 3 * n, 3)
        assert (cache.end // FL, cache.fill // FL) == (g, e)
        assert plan.rolls == (n >= 4)
        window = list(range(max(3, 3 * n + 3 - 9), 3 * n + 3))
        assert _buffer_frames(cache) == [0, 1, 2] + window


def test_sink_is_never_evicted_or_rewritten():
    cache = _cache(cap_frames=6, sink_frames=2)
    _commit(cache, 0, 2)
    sink = cache.k[0][:, : 2 * FL].clone()
    for start in range(2, 40, 2):
        _commit(cache, start, 2)
        assert torch.equal(cache.k[0][:, : 2 * FL], sink)


def test_plan_and_gather_do_not_write():
    cache = _cache()
    for n in range(5):
        _commit(cache, 3 * n, 3)
    before = (cache.k[0].clone(), cache.v[0].clone(), cache.end, cache.fill)
    plan = cache.plan(15 * FL, 3 * FL)
    new = _frames(15, 3) + 100
    sk, wk = _sink_and_window(cache, plan, new)
    assert torch.equal(cache.k[0], before[0]) and torch.equal(cache.v[0], before[1])
    assert (cache.end, cache.fill) == before[2:]
    # the view is the post-commit layout: sink, 6 kept frames, then the new chunk
    assert sk[0, ::FL, 0, 0].tolist() == [0, 1, 2]
    assert wk[0, ::FL, 0, 0].tolist() == [9, 10, 11, 12, 13, 14, 115, 116, 117]


def test_window_limited_by_max_attention():
    cache = _cache(cap_frames=12, sink_frames=3, max_frames=9)  # 6 window frames
    for n in range(4):
        _commit(cache, 3 * n, 3)
    plan = cache.plan(12 * FL, 3 * FL)
    new = _frames(12, 3)
    _, wk = _sink_and_window(cache, plan, new)
    assert wk[0, ::FL, 0, 0].tolist() == [9, 10, 11, 12, 13, 14]


def test_recompute_protects_sink_and_keeps_pointers():
    cache = _cache()
    for n in range(10):
        _commit(cache, 3 * n, 3)
    end, fill = cache.end, cache.fill
    plan = cache.plan(18 * FL, 12 * FL)  # re-encode frames 18..29, already committed
    assert plan.recompute and plan.skip == 3 * FL and plan.write_start == 3 * FL
    new = _frames(18, 12) + 1000
    cache.commit_layer(0, plan, new, new)
    cache.advance(plan)
    assert (cache.end, cache.fill) == (end, fill)
    assert _buffer_frames(cache) == [0, 1, 2] + [1000 + f for f in range(21, 30)]


def test_recache_from_frame_zero_overwrites_sink():
    """Reference quirk K3: a recache starting at frame 0 is not a recompute."""
    cache = _cache()
    for n in range(3):
        _commit(cache, 3 * n, 3)
    plan = cache.plan(0, 9 * FL)
    assert not plan.recompute
    new = _frames(0, 9) + 1000
    cache.commit_layer(0, plan, new, new)
    assert _buffer_frames(cache)[:3] == [1000, 1001, 1002]


def test_global_cache_never_rolls():
    cache = KVCache(1, 1, capacity=30 * FL, sink_tokens=3 * FL, max_attention_tokens=30 * FL,
                    num_heads=1, head_dim=1, rolling=False)
    for n in range(10):
        plan = _commit(cache, 3 * n, 3)
        assert not plan.rolls
    assert _buffer_frames(cache) == list(range(30))


def test_sink_not_yet_full_reads_zeros_after_the_chunk():
    """One-frame chunks with a three-frame sink: chunk 0 attends its own frame then the two
    unfilled (zero) sink positions, as the reference reads temp[0:S]."""
    cache = _cache(cap_frames=6, sink_frames=3)
    plan = cache.plan(0, FL)
    new = _frames(0, 1) + 7
    sink, window = _sink_and_window(cache, plan, new)
    assert sink[0, ::FL, 0, 0].tolist() == [7, 0, 0] and window.shape[1] == 0


def test_committed_views_never_change():
    """Copy on write: what a call read (views into the cache) keeps its values through later
    appends, rolls and recaches, so a backward pass that re-reads it sees the forward's keys."""
    cache = _cache(cap_frames=6, sink_frames=3)
    reads = []
    for n in range(6):
        plan = cache.plan(3 * n * FL, 3 * FL)
        views = [*cache.sink_context(0, plan).k, *cache.window_context(0, plan).k]
        reads += [(t, t.clone()) for t in views]
        _commit(cache, 3 * n, 3)
    plan = cache.plan(15 * FL, 3 * FL)  # a recache of the last chunk rewrites committed slots
    cache.commit_layer(0, plan, _frames(15, 3) + 50, _frames(15, 3) + 50)
    assert reads and all(torch.equal(view, copy) for view, copy in reads)
    assert _buffer_frames(cache) == [0, 1, 2, 65, 66, 67]


def test_training_capacity_appends_in_place():
    """A cache that holds the whole rollout never evicts or copies: every commit appends into
    the same buffer, while the attention window stays at max_attention."""
    cache = _cache(cap_frames=15, sink_frames=3, max_frames=9)
    buffer = cache.k[0]
    for n in range(4):
        plan = _commit(cache, 3 * n, 3)
        assert not plan.rolls and cache.k[0] is buffer
    plan = cache.plan(12 * FL, 3 * FL)
    _, wk = _sink_and_window(cache, plan, _frames(12, 3))
    assert wk[0, ::FL, 0, 0].tolist() == [9, 10, 11, 12, 13, 14]
