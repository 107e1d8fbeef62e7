"""The traffic heatmap's pure functions (mean over steps, group totals, labels), and the view drawing them."""

from course_lib.expert_parallel import traffic_matrix
from course_lib.widgets import TrafficHeatmap, heatmap_text, mean_matrix, traffic_summary


def test_mean_matrix_averages_every_cell():
    assert mean_matrix([[[0, 2], [4, 0]], [[0, 4], [0, 0]]]) == [[0, 3], [2, 0]]
    assert mean_matrix([]) == []


def test_traffic_summary_splits_cross_group_bytes():
    m = [[0, 1, 10, 100], [2, 0, 20, 200], [3, 30, 0, 300], [4, 40, 400, 0]]
    s = traffic_summary(m, ranks_per_group=2)  # groups {0, 1} and {2, 3}
    assert s["total"] == sum(map(sum, m))
    assert s["cross_group"] == 10 + 100 + 20 + 200 + 3 + 30 + 4 + 40
    assert s["busiest_sender_share"] == (4 + 40 + 400) / s["total"]
    assert traffic_summary([[0, 0], [0, 0]])["busiest_sender_share"] == 0.0


def test_heatmap_view_draws_the_mean_of_its_steps():
    view = TrafficHeatmap(live=False)
    first, second = traffic_matrix([[1, 2], [3, 4]], 8, 2), traffic_matrix([[1, 4], [1, 4]], 8, 2)
    view.update(0, first)
    assert [list(row) for row in view.fig.data[0].z] == first  # the first step draws at once
    view.update(1, second)  # within min_interval: recorded, drawn by finish()
    summary = view.finish()
    drawn = [list(row) for row in view.fig.data[0].z]
    assert drawn == mean_matrix([first, second]) and drawn[0][1] == (first[0][1] + second[0][1]) / 2
    assert heatmap_text(drawn)[0][0] == "·" and heatmap_text(drawn)[0][1].endswith("kB")
    assert summary["total"] == sum(map(sum, drawn))
