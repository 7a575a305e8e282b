"""E2E data reading, the five official metrics and the score command.

The fixtures in tests/fixtures/e2e are 12 dev-set MRs (refs.csv) and three prediction files
(perturbed references, template outputs, an empty line in the middle or at the end), with the
numbers the official scorer (tuetschek/e2e-metrics, default Perl mteval for BLEU/NIST) printed
for them in official_scores.json. It prints 4 decimals, so ours must agree within 1e-4.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from experiments import e2e as e2e_cli
from vera_jax.data import e2e
from vera_jax.metrics import nlg

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "e2e")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "e2e")
with open(os.path.join(FIXTURES, "official_scores.json")) as _f:
    OFFICIAL = json.load(_f)["scores"]
TOL = 1e-4
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR/ROUGE-L/CIDEr need Java")


def fixture_inputs(name):
    _, refs = e2e.read_csv(os.path.join(FIXTURES, "refs.csv")).by_mr()
    preds = e2e_cli.read_predictions(os.path.join(FIXTURES, f"pred_{name}.txt"))
    return preds, refs


@pytest.fixture(scope="module")
def ours():
    return {name: nlg.score_e2e(*fixture_inputs(name)) for name in OFFICIAL} if shutil.which("java") else None


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_bleu_and_nist_match_official_scorer(name):
    preds, refs = fixture_inputs(name)
    assert nlg.bleu(preds, refs) == pytest.approx(OFFICIAL[name]["BLEU"], abs=TOL)
    assert nlg.nist(preds, refs) == pytest.approx(OFFICIAL[name]["NIST"], abs=TOL)


@needs_java
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_all_five_match_official_scorer_including_empty_prediction_lines(ours, name):
    assert "" in fixture_inputs("mixed")[0] and fixture_inputs("last_empty")[0][-1] == ""
    assert list(ours[name]) == list(nlg.METRIC_NAMES)
    for metric, want in OFFICIAL[name].items():
        assert ours[name][metric] == pytest.approx(want, abs=TOL), metric


def test_prediction_count_must_match_mr_count():
    with pytest.raises(ValueError, match="2 predictions for 3 MRs"):
        nlg.bleu(["a", "b"], [["a"], ["b"], ["c"]])


def test_missing_java_names_the_package_instead_of_scoring_zero(monkeypatch):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    with pytest.raises(nlg.JavaNotFoundError, match="default-jre-headless"):
        nlg.score_e2e(["a pub"], [["a pub"]])


def write_csv(path, rows, raw_tail=""):
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
        f.write(raw_tail)
    return str(path)


def test_pairs_for_training_groups_per_mr_in_first_appearance_order(tmp_path):
    path = write_csv(tmp_path / "d.csv", [["mr", "ref"], ["name[B]", "b1"], ["name[A]", "a1"], ["name[B]", "b2, \"q\""],
                                          [], ["name[C]", "c1"]])
    split = e2e.read_csv(path)
    assert len(split) == 4 and split.refs[2] == 'b2, "q"'
    assert split.by_mr() == (["name[B]", "name[A]", "name[C]"], [["b1", 'b2, "q"'], ["a1"], ["c1"]])


@pytest.mark.parametrize("rows,tail,where", [
    ([["mr", "ref"], ["name[A]", "a"], ["name[B]", "b", "extra"]], "", ":3: 3 fields, header has 2"),
    ([["mr", "ref"], ["name[A]", "a"], ["name[B]", ""]], "", ":3: empty ref"),
    ([["mr", "text"], ["name[A]", "a"]], "", ":1: header .* lacks column"),
    ([["mr", "ref"], ["name[A]", "a"]], 'name[B],"unterminated\n', ":3: "),
])
def test_malformed_csv_names_file_and_line(tmp_path, rows, tail, where):
    path = write_csv(tmp_path / "bad.csv", rows, tail)
    with pytest.raises(e2e.E2EDataError, match=f"bad.csv{where}"):
        e2e.read_csv(path)


def test_tfds_e2e_cleaned_through_data_source_mock():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        split = e2e.read_tfds("train")
    assert len(split) == 4 and split.source == "tfds e2e_cleaned[train]"
    assert (all(isinstance(m, str) and m.endswith("]") for m in split.mrs)
            and all(isinstance(r, str) for r in split.refs))


def test_parse_mr_and_template():
    mr = "name[The Eagle], eatType[coffee shop], customer rating[5 out of 5], familyFriendly[no]"
    assert e2e.parse_mr(mr) == {"name": "The Eagle", "eatType": "coffee shop", "customer rating": "5 out of 5",
                                "familyFriendly": "no"}
    assert e2e.template(mr) == ("The Eagle is a coffee shop. Its customer rating is 5 out of 5. "
                                "It is not family friendly.")
    with pytest.raises(e2e.E2EDataError, match="slot\\[value\\]"):
        e2e.parse_mr("name[The Eagle] food")


def run_cli(*args):
    flags.FLAGS.unparse_flags()
    argv = flags.FLAGS(["e2e", *args])
    e2e_cli.main(argv)


@needs_java
def test_score_command_prints_official_scale_json(capsys):
    run_cli("score", "--references", os.path.join(FIXTURES, "refs.csv"),
            "--predictions", os.path.join(FIXTURES, "pred_mixed.txt"))
    scores = json.loads(capsys.readouterr().out)
    assert scores == pytest.approx(OFFICIAL["mixed"], abs=TOL)


def test_score_command_refuses_wrong_line_count_with_both_counts(tmp_path):
    preds = tmp_path / "p.txt"
    preds.write_text("one\ntwo\n")
    out = subprocess.run([sys.executable, "-m", "experiments.e2e", "score", "--references",
                          os.path.join(FIXTURES, "refs.csv"), "--predictions", str(preds)],
                         capture_output=True, text=True, check=False, cwd=os.path.join(os.path.dirname(__file__), ".."),
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0
    assert "has 2 lines but" in out.stderr and "has 12 distinct MRs" in out.stderr


def test_score_command_without_java_exits_2_naming_the_package(monkeypatch, capsys):
    monkeypatch.setattr(nlg.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        run_cli("score", "--references", os.path.join(FIXTURES, "refs.csv"),
                "--predictions", os.path.join(FIXTURES, "pred_mixed.txt"))
    assert exit_.value.code == 2 and "default-jre-headless" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data/e2e absent")
def test_shared_official_csvs_row_and_mr_counts_and_a_small_score():
    counts = {}
    for split in ("train", "dev", "test"):
        data = e2e.read_local(SHARED, split)
        counts[split] = (len(data), len(data.by_mr()[0]))
    assert counts == {"train": (42061, 4862), "dev": (4672, 547), "test": (4693, 630)}
    mrs, refs = e2e.read_local(SHARED, "dev").by_mr()
    preds = [e2e.template(mr) for mr in mrs[:20]]
    assert 0.2 < nlg.bleu(preds, refs[:20]) < 0.8 and 3 < nlg.nist(preds, refs[:20]) < 10
