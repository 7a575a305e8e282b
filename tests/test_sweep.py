"""experiments/sweep.py: expansion, skip/resume, failures recorded, commands, the median rule."""

import json
import textwrap
from pathlib import Path

import ml_collections
import pytest

from experiments import sweep

# A stand-in experiment: writes summary.json from its overrides; fails for method=broken.
FAKE = textwrap.dedent(
    """
    import json, sys, pathlib
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    over = {k[len("--config."):]: json.loads(v) if v[:1] in "[{" or v.isdigit() else v
            for k, v in args.items() if k.startswith("--config.")}
    workdir = pathlib.Path(args["--workdir"])
    with open(workdir.parent / "calls.txt", "a") as f:
        f.write(workdir.name + "\\n")
    if over["method"] == "broken":
        sys.exit(3)
    acc = {"vera": 0.8, "lora": 0.7}[over["method"]] + 0.01 * int(over["seed"]) + 0.001 * int(over.get("r", 0))
    summary = {"best": {"metric": "accuracy", "mode": "max", "value": acc, "epoch": 2,
                        "metrics": {"accuracy": acc, "f1": acc / 2}}, "trainable_params": 100}
    (workdir / "summary.json").write_text(json.dumps(summary))
    """
)


def _config(tmp_path, grid, seeds=(0, 1, 2)):
    c = ml_collections.ConfigDict()
    c.module = "fake_experiment"
    c.config = "configs/whatever.py"
    c.root = str(tmp_path / "sweep")
    c.fixed = {"num_epochs": 2}
    c.grid = grid
    c.seeds = list(seeds)
    return c


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_experiment.py").write_text(FAKE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_expand_is_the_union_of_products_crossed_with_seeds(tmp_path):
    c = _config(tmp_path, [{"method": ["vera"], "r": [4, 8]}, {"method": ["lora"]}, {"method": ["lora"]}], seeds=[0, 1])
    runs = sweep.expand(c)
    assert [r.name for r in runs] == ["method=vera,r=4,seed=0", "method=vera,r=4,seed=1", "method=vera,r=8,seed=0",
                                      "method=vera,r=8,seed=1", "method=lora,seed=0", "method=lora,seed=1"]
    assert runs[0].workdir == tmp_path / "sweep" / "method=vera,r=4,seed=0"
    cmd = sweep.command(c, runs[0], python="python")
    assert cmd == ["python", "-m", "fake_experiment", "--config=configs/whatever.py", f"--workdir={runs[0].workdir}",
                   "--config.num_epochs=2", "--config.method=vera", "--config.r=4", "--config.seed=0"]
    c.fixed = {"num_epochs": 2, "data": {"train_limit": 0, "dir": "glue"}}
    assert sorted(sweep.command(c, runs[0], python="python")[5:8]) == [
        "--config.data.dir=glue", "--config.data.train_limit=0", "--config.num_epochs=2"]


def test_run_skips_finished_records_failures_and_resumes(tmp_path, fake_module):
    c = _config(tmp_path, [{"method": ["vera", "broken"]}], seeds=[0, 1])
    counts = sweep.run_local(c, workers=2)
    assert counts == {"total": 4, "skipped": 0, "finished": 2, "failed": 2}
    failures = [json.loads(line) for line in (tmp_path / "sweep" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["run"] for f in failures) == ["method=broken,seed=0", "method=broken,seed=1"]
    assert all(f["exit_code"] == 3 for f in failures)
    # "interrupt": forget one finished run, then the same command again runs only what is missing
    (tmp_path / "sweep" / "method=vera,seed=1" / "summary.json").unlink()
    (tmp_path / "sweep" / "calls.txt").unlink()
    counts = sweep.run_local(c)
    assert counts == {"total": 4, "skipped": 1, "finished": 1, "failed": 2}
    assert sorted((tmp_path / "sweep" / "calls.txt").read_text().split()) == [
        "method=broken,seed=0", "method=broken,seed=1", "method=vera,seed=1"]


def test_report_takes_the_median_over_seeds(tmp_path, fake_module):
    c = _config(tmp_path, [{"method": ["vera", "lora"], "r": [1, 4]}], seeds=[0, 1, 2, 3, 4])
    sweep.run_local(c, workers=2)
    table = sweep.median_table(c, sweep.collect(c))
    by = {(row["method"], row["r"]): row for row in table}
    assert len(table) == 4 and all(row["seeds"] == 5 for row in table)
    assert by[("vera", "4")]["median_accuracy"] == pytest.approx(0.8 + 0.02 + 0.004)  # seeds 0..4 -> median 2
    assert by[("lora", "1")]["median_f1"] == pytest.approx((0.7 + 0.02 + 0.001) / 2)
    assert by[("lora", "1")]["trainable_params"] == 100
    paths = sweep.write_report(c, table, plot_x="rank,r")
    md = paths["md"].read_text()
    assert "| method | r | seeds | trainable_params | best_metric | median_accuracy | median_f1 |" in md
    assert "| vera | 4 | 5 | 100 | accuracy | 0.8240 | 0.4120 |" in md
    assert paths["png"].stat().st_size > 1000 and paths["csv"].read_text().count("\n") == 5


def test_median_of_an_even_number_of_seeds_is_the_mean_of_the_middle_two(tmp_path, fake_module):
    c = _config(tmp_path, [{"method": ["vera"]}], seeds=[0, 1, 2, 3])
    sweep.run_local(c)
    [row] = sweep.median_table(c, sweep.collect(c))
    assert row["median_accuracy"] == pytest.approx(0.815)


def test_commands_for_shell_and_tpu(tmp_path, capsys):
    c = _config(tmp_path, [{"method": ["vera"]}], seeds=[0])
    [line] = sweep.emit(c, "shell")
    assert line.startswith("python -m fake_experiment --config=configs/whatever.py") and "--config.seed=0" in line
    [tpu] = sweep.emit(c, "tpu", tpu="my-tpu", zone="us-central2-b")
    assert tpu.startswith(
        "gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all --command='python -m")
    with pytest.raises(ValueError, match="--format tpu needs --tpu NAME and --zone ZONE"):
        sweep.emit(c, "tpu")
    with pytest.raises(ValueError, match=r"--format: 'slurm' is not one of"):
        sweep.emit(c, "slurm")


def test_grid_key_config_picks_the_config_file(tmp_path):
    c = _config(tmp_path, [{"config": ["configs/a.py", "configs/b.py"], "method": ["vera"]}], seeds=[0])
    runs = sweep.expand(c)
    assert [r.name for r in runs] == [f"config=configs_{x}.py,method=vera,seed=0" for x in "ab"]
    assert sweep.command(c, runs[1], python="python")[3:] == [
        "--config=configs/b.py", f"--workdir={runs[1].workdir}", "--config.num_epochs=2", "--config.method=vera",
        "--config.seed=0"]


def test_cli_on_a_config_file(tmp_path, fake_module, capsys):
    spec = tmp_path / "my_sweep.py"
    spec.write_text(textwrap.dedent(f"""
        import ml_collections
        def get_config(arg="vera"):
            c = ml_collections.ConfigDict()
            c.module, c.config, c.root = "fake_experiment", "x.py", {str(tmp_path / "cli")!r}
            c.grid = [{{"method": [arg]}}]
            c.seeds = [0, 1, 2]
            return c
    """))
    assert sweep.main(["run", f"{spec}:lora"]) == 0
    assert sweep.main(["report", f"{spec}:lora"]) == 0
    out = capsys.readouterr().out
    assert "| lora | 3 | 100 | accuracy | 0.7100 | 0.3550 |" in out
    with pytest.raises(ValueError, match="missing field 'seeds'"):
        spec.write_text("import ml_collections\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                        "    c.module = c.config = c.root = 'x'\n    c.grid = []\n    return c\n")
        sweep.load_sweep(str(spec))


def test_shipped_sweep_configs_expand(tmp_path):
    sweeps = Path(__file__).parents[1] / "configs" / "sweeps"
    mrpc = sweep.load_sweep(str(sweeps / "minilm_mrpc.py"))
    assert len(sweep.expand(mrpc)) == 6
    sst2 = sweep.load_sweep(str(sweeps / "minilm_sst2.py"))
    runs = sweep.expand(sst2)
    assert len(runs) == (3 + 2 + 1) * 3 and sst2.config == "configs/minilm_sst2.py"
    assert "--config.lr.vera=0.1" in sweep.command(sst2, runs[6])
    full = sweep.load_sweep(str(sweeps / "minilm_mrpc_full.py"))
    assert len(sweep.expand(full)) == 6 and "--config.data.train_limit=0" in sweep.command(full, sweep.expand(full)[0])
    rank = sweep.load_sweep(f"{sweeps / 'rank_rte.py'}:roberta_large")
    runs = sweep.expand(rank)
    assert len(runs) == (4 + 5) * 5 and rank.config == "configs/roberta_large_rte.py"
    assert "--config.vera.r=16" in sweep.command(rank, runs[0])
    with pytest.raises(ValueError, match="rank_rte sweep arg"):
        sweep.load_sweep(f"{sweeps / 'rank_rte.py'}:gpt")
    # issue 23's gap study: every grid point x seeds, each run at its own method's rate
    for name, n in (("gap_minilm_sst2.py", 9 * 3), ("gap_minilm_mrpc.py", 3), ("gap_smollm2_e2e.py", 2),
                    ("gap_gemma3_e2e.py", 2)):
        gap = sweep.load_sweep(str(sweeps / name))
        runs = sweep.expand(gap)
        assert len(runs) == n, name
        for run in runs:
            argv = sweep.command(gap, run)
            assert any(a.startswith(f"--config.lr.{run.params['method']}=") for a in argv), argv
