"""The book's figures are built from real values: check the data that ends up on the axes."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from alive import plots


def test_linked_activation_figure_draws_members_and_slopes():
    fig = plots.linked_activation_figure(-2.0, 2.0, points=41)
    top_relu, bottom_relu = fig.axes[0], fig.axes[2]
    z = np.linspace(-2.0, 2.0, 41)
    (g1, g2) = [line.get_ydata() for line in top_relu.get_lines()]
    np.testing.assert_allclose(g1, np.maximum(z, 0), atol=1e-6)
    np.testing.assert_allclose(g2, np.minimum(z, 0), atol=1e-6)
    (d1, d2) = [line.get_ydata() for line in bottom_relu.get_lines()]
    np.testing.assert_array_equal(d1 + d2, np.ones_like(z))  # min-max: exactly one member has slope 1
    top_selu = fig.axes[1]
    (s1, s2) = [line.get_ydata() for line in top_selu.get_lines()]
    np.testing.assert_allclose(s2, s1[::-1], atol=1e-6)  # mirror: g(-z)
    matplotlib.pyplot.close(fig)


def test_linked_activation_figure_extra_panel():
    fig = plots.linked_activation_figure(points=11, extra=["lk-relu"])
    assert len(fig.axes) == 6
    matplotlib.pyplot.close(fig)


def test_heatmaps_rejects_unknown_methods():
    grid = pd.DataFrame({"method": ["relu"], "depth": [1], "width": [2], "best_val_acc": [0.5]})
    with pytest.raises(ValueError, match="none of the requested methods"):
        plots.heatmaps(grid, ["sep-up"])


def test_book_number_format_keeps_small_values_visible():
    assert plots._number(0.0) == "0.000" and plots._number(0.5123) == "0.512"
    assert plots._number(5e-5) == "5.00e-05" and plots._number(-2e-4) == "-2.00e-04"


def test_linked_activation_figure_refuses_a_bad_range():
    from alive.config import ConfigError

    for kw, message in (({"points": -5}, "points"), ({"points": 1.5}, "points"), ({"z_min": 3.0, "z_max": -3.0}, "z_min < z_max")):
        with pytest.raises(ConfigError, match=message):
            plots.linked_activation_figure(**kw)
