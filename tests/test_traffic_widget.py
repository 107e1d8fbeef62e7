"""The traffic heatmap's pure functions: bytes from split sizes, group totals, labels; the view draws them."""

from course_lib.expert_parallel import row_bytes
from course_lib.widgets import TrafficHeatmap, heatmap_text, traffic_bytes, traffic_summary


def test_traffic_bytes_counts_dispatch_out_and_combine_answers():
    splits = [[5, 2, 0], [1, 4, 3], [0, 0, 6]]  # rank i sent splits[i][j] rows to rank j
    m = traffic_bytes(splits, 10, 7)
    assert m[0] == [0, 2 * 10 + 1 * 7, 0]  # rank 0 -> 1: 2 dispatch rows out, answers to rank 1's 1 row
    assert m[1] == [1 * 10 + 2 * 7, 0, 3 * 10]
    assert m[2] == [0, 3 * 7, 0]  # rank 2 sent nothing itself: it only answers rank 1's 3 rows
    assert [m[i][i] for i in range(3)] == [0, 0, 0]  # rows kept at home move no bytes


def test_traffic_summary_splits_cross_group_bytes():
    m = [[0, 1, 10, 100], [2, 0, 20, 200], [3, 30, 0, 300], [4, 40, 400, 0]]
    s = traffic_summary(m, ranks_per_group=2)  # groups {0, 1} and {2, 3}
    assert s["total"] == sum(map(sum, m))
    assert s["cross_group"] == 10 + 100 + 20 + 200 + 3 + 30 + 4 + 40
    assert s["busiest_sender_share"] == (4 + 40 + 400) / s["total"]
    assert traffic_summary([[0, 0], [0, 0]])["busiest_sender_share"] == 0.0


def test_heatmap_view_shows_the_mean_of_its_steps():
    d, c = row_bytes(8, 2)
    view = TrafficHeatmap(d, c, live=False)
    view.update(0, [[1, 2], [3, 4]])
    view.update(1, [[1, 4], [1, 4]])
    assert view.mean_matrix() == [[0, (2 * d + 3 * c + 4 * d + 1 * c) / 2], [(3 * d + 2 * c + 1 * d + 4 * c) / 2, 0]]
    assert view.fig.data[0].z is not None and view.draws >= 1
    assert heatmap_text(view.mean_matrix())[0][0] == "·"
    assert view.finish()["total"] == sum(map(sum, view.mean_matrix()))
