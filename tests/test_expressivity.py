"""experiments/expressivity.py on a tiny config: outputs written, LoRA reaches its SVD optimum,
VeRA's budget is n + r and its error falls as r grows."""

import csv

from configs import expressivity as expressivity_config
from experiments import expressivity


def test_tiny_fit_writes_table_plot_and_sensible_errors(tmp_path):
    config = expressivity_config.get_config()
    config.n, config.lora_ranks, config.vera_ranks, config.num_seeds, config.steps = 12, (1, 3), (4, 64), 1, 400
    rows = expressivity.run(config, tmp_path)
    for name in ("expressivity.csv", "expressivity.md", "expressivity.json", "expressivity.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list(csv.DictReader(open(tmp_path / "expressivity.csv")))) == 4
    by = {(r["method"], r["rank"]): r for r in rows}
    assert by[("lora", 1)]["params"] == 24 and by[("vera", 4)]["params"] == 16
    for rank in (1, 3):
        lora = by[("lora", rank)]
        assert lora["rel_error"] < lora["svd_optimum"] + 0.02  # gradient descent finds the rank-k optimum
    assert by[("vera", 64)]["rel_error"] < by[("vera", 4)]["rel_error"] < 1.0
    assert "| vera | 4 | 16 |" in (tmp_path / "expressivity.md").read_text()
