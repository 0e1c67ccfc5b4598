"""``moca ablate`` end to end at a reduced size: the causal base trained first, then every row from
it over two seeds, each trained as its row says, summarized from each run's eval.json, written as
JSON, a table and a plot."""
import json
import statistics

from PIL import Image

from moca import cli
from moca.ablate import ROWS, against, plot, summarize, summarize_reading, table
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
    assert "reading" not in result  # the picture probe knows only the embedded data's words
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
        # every row starts from the one causal base the ablation trained first
        assert {c.model.init for c in configs} == {str(out / "base")}
    base = Config.read(str(out / "base"))
    assert (base.run.stage, base.cpt.objective, base.cpt.lr, base.run.seed) == ("cpt", "next-token", 3e-3, 10_000)
    assert result["chance"]["precision_at_1"] == 0.25
    assert set(result["against_cl"]) == set(ROWS) - {"cl"}
    p1 = result["against_cl"]["cpt+cl"]["precision_at_1"]
    assert p1["difference"] == round(result["rows"]["cpt+cl"]["precision_at_1"]["mean"] -
                                     result["rows"]["cl"]["precision_at_1"]["mean"], 4)
    markdown = (out / "ablation.md").read_text()
    assert markdown.startswith("| row | ") and "| cpt+cl | " in markdown and "| chance | " in markdown
    assert table(result) in printed
    assert Image.open(out / "ablation.png").size[0] > 600
    # run again: every row is already evaluated, nothing is trained again, the same summary
    before = [(out / d / "metrics.jsonl").stat().st_mtime_ns for d in ("base", "cl/seed-0")]
    assert cli.main(argv) == 0 and json.loads((out / "ablation.json").read_text())["rows"] == result["rows"]
    assert [(out / d / "metrics.jsonl").stat().st_mtime_ns for d in ("base", "cl/seed-0")] == before
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


def test_on_the_embedded_data_rows_with_mlm_are_probed_for_reading_the_pictures(tmp_path):
    out = tmp_path / "ablation"
    argv = ["ablate", "--out", str(out), "--seeds", "2", "--rows", "cl,mae+cl,cpt+cl", "max_steps=2",
            "pairs_per_batch=4", "token_budget=512", "log_every=1"]
    assert cli.main(argv) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert list(result["reading"]) == ["cpt+cl"]  # cl has no stage 1, mae+cl no MLM head to ask
    color = result["reading"]["cpt+cl"]["color"]
    assert color["chance"] == round(1 / 6, 4) and len(color["pictures"]["values"]) == 2
    # every seed trains on the same draw of the embedded data; the base on a draw of its own
    documents = {(out / "cpt+cl" / f"seed-{s}" / "cpt" / "data" / "cpt.jsonl").read_text() for s in range(2)}
    pairs = {(out / "cl" / f"seed-{s}" / "data" / "pairs.jsonl").read_text() for s in range(2)}
    assert len(documents) == 1 and len(pairs) == 1
    assert (out / "base" / "data" / "cpt.jsonl").read_text() not in documents
    assert Config.read(str(out / "base")).data.embedded_seed == 10_000
    assert (out / "cpt+cl" / "seed-0" / "cpt" / "probe-data" / "cpt.jsonl").is_file()
    assert "| cpt+cl | " in (out / "ablation.md").read_text().split("Does stage 1 read the pictures?")[1]


def test_reading_summary_and_its_table():
    per_seed = [{"color": {"pictures": 0.5, "noise": 0.2, "chance": 0.1667, "n": 10}},
                {"color": {"pictures": 0.3, "noise": 0.1, "chance": 0.1667, "n": 9}}]
    reading = summarize_reading({"cpt+cl": per_seed})
    assert reading == {"cpt+cl": {"color": {"chance": 0.1667,
                                            "pictures": {"mean": 0.4, "std": 0.1414, "values": [0.5, 0.3]},
                                            "noise": {"mean": 0.15, "std": 0.0707, "values": [0.2, 0.1]}}}}
    result = summarize({"cpt+cl": [{"precision_at_1": 0.5, "chance_precision_at_1": 0.25, "n": 4}] * 2})
    text = table({**result, "reading": reading})
    assert "| cpt+cl | 0.400 / 0.150 |" in text and "| chance | 0.167 |" in text


def test_rows_against_stage_two_alone():
    rows = summarize({"cl": [{"precision_at_1": p, "ndcg_at_5": p, "n": 4} for p in (0.5, 0.7)],
                      "cpt+cl": [{"precision_at_1": p, "ndcg_at_5": q, "n": 4} for p, q in ((0.9, 0.6), (0.9, 0.8))]})
    compared = against(rows["rows"], "cl")
    # P@1: +0.3 against spreads 0.1414 and 0; nDCG@5: +0.1 against 0.1414 each
    assert compared == {"cpt+cl": {"precision_at_1": {"difference": 0.3, "spread": 0.1414, "beyond": True},
                                   "ndcg_at_5": {"difference": 0.1, "spread": 0.1414, "beyond": False}}}
    text = table({**rows, "against_cl": compared})
    assert "| cpt+cl | +0.300 (more than 0.141) | +0.100 (not more than 0.141) |" in text


def test_the_table_reads_recall_over_each_tasks_whole_pool(tmp_path):
    # eval.json's overall carries the pool scores (moca.eval.pool_metrics): the table shows them
    # beside chance, and the rows are compared on pool Recall@1 too (the harder reading)
    overall = [{"precision_at_1": p, "pool_recall_at_1": r, "chance_precision_at_1": 0.25,
                "chance_pool_recall_at_1": 0.0061, "n": 80} for p, r in ((0.9, 0.06), (0.95, 0.07))]
    ahead = [dict(o, pool_recall_at_1=o["pool_recall_at_1"] + 0.2) for o in overall]
    rows = summarize({"cl": overall, "cpt+cl": ahead})
    compared = against(rows["rows"], "cl")
    assert compared["cpt+cl"]["pool_recall_at_1"] == {"difference": 0.2, "spread": 0.0071, "beyond": True}
    text = table({**rows, "against_cl": compared})
    assert "| row | precision_at_1 | pool_recall_at_1 |" in text and "| chance | 0.250 | 0.006 |" in text
    plot({**rows, "against_cl": compared}, str(tmp_path / "a.png"))
    assert Image.open(tmp_path / "a.png").size[0] == 160 + (40 * 2 + 40) * 2  # two bars a row
