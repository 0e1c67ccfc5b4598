"""``moca ablate`` end to end at a reduced size: every row over two seeds, each trained as its row
says, summarized from each run's eval.json, written as JSON, a table and a plot."""
import json
import statistics

from PIL import Image

from moca import cli
from moca.ablate import ROWS, summarize, table
from moca.config import Config


def test_the_ablation_end_to_end_on_user_files(tmp_path, capsys):
    from moca.data import embedded
    documents = embedded.write(str(tmp_path / "cpt"), documents=16)
    pairs = embedded.write_pairs(str(tmp_path / "pairs"), pairs=16)
    evaluation = embedded.write_eval(str(tmp_path / "eval"), queries=6)
    out = tmp_path / "ablation"
    argv = ["ablate", "--out", str(out), "--seeds", "2", "--data", documents, f"pairs={pairs}",
            f"evaluation={evaluation}", "max_steps=2", "pairs_per_batch=4", "token_budget=512", "log_every=1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["rows"]) == list(ROWS) and result["seeds"] == 2
    for name in ROWS:
        runs = [out / name / f"seed-{s}" for s in range(2)]
        stage_two = [r / "cl" if ROWS[name]["run.stage"] == "both" else r for r in runs]
        overall = [json.loads((r / "eval.json").read_text())["overall"] for r in stage_two]
        assert overall[0]["n"] == 6
        metrics = result["rows"][name]
        assert set(metrics) == {k for k in overall[0] if k != "n" and not k.startswith("chance")}
        for metric, summary in metrics.items():
            values = [o[metric] for o in overall]
            assert summary["values"] == values
            assert summary["mean"] == round(statistics.fmean(values), 4)
            assert summary["std"] == round(statistics.stdev(values), 4)
        configs = [Config.read(str(r)) for r in stage_two]
        assert [c.run.seed for c in configs] == [0, 1]
        assert {(c.cl.attention, c.cl.pooling) for c in configs} == \
            ({("causal", "last")} if name == "cl-causal" else {("bidirectional", "mean")})
        if ROWS[name]["run.stage"] == "both":
            first = Config.read(str(runs[0] / "cpt"))
            assert (first.cpt.use_mlm, first.cpt.use_mae) == {"mlm+cl": (True, False), "mae+cl": (False, True),
                                                             "cpt+cl": (True, True)}[name]
            assert configs[0].cl.init == str(runs[0] / "cpt")
        else:
            assert configs[0].cl.init is None and not (runs[0] / "cpt").exists()
    assert result["chance"]["precision_at_1"] == 0.25
    markdown = (out / "ablation.md").read_text()
    assert markdown.startswith("| row | ") and "| cpt+cl | " in markdown and "| chance | " in markdown
    assert table(result) in printed
    assert Image.open(out / "ablation.png").size[0] > 600
    # run again: every row is already evaluated, nothing is trained again, the same summary
    before = (out / "cl" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns
    assert cli.main(argv) == 0 and json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]
    assert (out / "cl" / "seed-0" / "metrics.jsonl").stat().st_mtime_ns == before
    # with other settings, the runs there are not taken for the row's
    assert cli.main(argv[:-1] + ["log_every=1", "cl.lr=1e-4"]) == 2
    assert "was evaluated with other settings (cl.lr: 0.001 -> 0.0001)" in capsys.readouterr().err


def test_the_ablation_refuses_partial_user_data(tmp_path, capsys):
    assert cli.main(["ablate", "--out", str(tmp_path), "--data", str(tmp_path / "docs.jsonl")]) == 2
    assert "needs all three: --data DOCUMENTS, pairs=PAIRS and evaluation=EVAL" in capsys.readouterr().err
    assert cli.main(["ablate", "--out", str(tmp_path), "--rows", "cl,mlm"]) == 2
    assert "unknown row(s) ['mlm']" in capsys.readouterr().err


def test_summary_of_one_seed_has_no_spread():
    result = summarize({"cl": [{"precision_at_1": 0.5, "chance_precision_at_1": 0.25, "chance": 0.25, "n": 4}]})
    assert result == {"rows": {"cl": {"precision_at_1": {"mean": 0.5, "std": 0.0, "values": [0.5]}}},
                      "chance": {"precision_at_1": 0.25}, "seeds": 1}
