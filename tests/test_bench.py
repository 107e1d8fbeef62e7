import pytest

from course_lib import bench


def test_time_callable_warms_up_then_repeats():
    calls = []
    t = bench.time_callable(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times) == 5
    assert t.median == sorted(t.times)[2]
    assert t.per_second(10) == pytest.approx(10 / t.median)


def test_compare_alternates_the_two_callables():
    order = []
    c = bench.compare(lambda: order.append("a"), lambda: order.append("b"), warmup=1, repeats=3)
    assert order == ["a", "b"] * 4
    assert c.speedup == pytest.approx(c.b.median / c.a.median)


def test_compare_measures_a_real_difference():
    import time

    c = bench.compare(lambda: time.sleep(0.001), lambda: time.sleep(0.02), warmup=0, repeats=3)
    assert c.speedup > 3  # 20 ms vs 1 ms: only a broken timer misses this


def test_bad_repeat_counts():
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench.time_callable(lambda: None, repeats=0)
