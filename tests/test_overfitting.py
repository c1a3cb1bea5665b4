"""Chapter 10's figure: one panel per run, training and validation curves drawn from the history as given."""

import numpy as np
import pandas as pd

from resnet_lessons import plots


def history(train, val):
    epochs = np.arange(1, len(train) + 1)
    return pd.DataFrame({"epoch": epochs, "train_accuracy": train, "val_accuracy": val,
                         "train_loss": 1 - np.asarray(train), "val_loss": 1 - np.asarray(val)})


def test_gap_panels_draw_each_history_in_its_own_panel():
    histories = {"a": history([0.2, 0.6, 0.9], [0.2, 0.4, 0.5]), "b": history([0.1, 0.3], [0.1, 0.3]),
                 "c": history([0.5], [0.4])}
    fig = plots.gap_panels(histories, ncols=2)
    axes = fig.axes
    assert len(axes) == 4 and not axes[3].axison  # 3 runs in a 2x2 grid: the fourth panel is hidden
    assert [ax.get_title() for ax in axes[:3]] == ["a", "b", "c"]
    train_line, val_line = axes[0].get_lines()
    assert np.allclose(train_line.get_ydata(), [0.2, 0.6, 0.9]) and np.allclose(val_line.get_ydata(), [0.2, 0.4, 0.5])
    assert len(axes[0].collections) == 1  # the shaded gap
    loss = plots.gap_panels(histories, metric="loss")
    assert np.allclose(loss.axes[1].get_lines()[0].get_ydata(), [0.9, 0.7])
