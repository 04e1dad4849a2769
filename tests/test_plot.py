"""The plot CLI redraws a run's curves and compares several runs from their CSV logs."""

import pytest
from conftest import FAST, compose

from lit_vhead.plot import main, read_metrics
from lit_vhead.run import train


def test_plot_cli_redraws_one_run_and_compares_several(tmp_path, capsys):
    for name, lr in (("a", "1e-4"), ("b", "1e-3")):
        train(compose(FAST + [f"ppo.learning_rate={lr}"], tmp_path / name))
    assert [int(s) for s, _ in read_metrics(tmp_path / "a")["env/reward_mean"]] == [0, 1, 2, 3]
    main([str(tmp_path / "a")])
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.png")])
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert str(tmp_path / "cmp.png") in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="CSV logger"):
        read_metrics(tmp_path / "nowhere")
