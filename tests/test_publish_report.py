"""benchmarks/publish_report.py: a report.html over the size limit stays out of docs/, and report.md says where it is;
a stage stopped while trained again after a restore keeps its first training's description and curve."""

from conftest import load_benchmark


def test_a_large_report_html_is_left_in_the_study_folder(tmp_path):
    publish = load_benchmark("publish_report")
    src = tmp_path / "study"
    (src / "figures").mkdir(parents=True)
    (src / "report.md").write_text("# r\n![curve](figures/pretext_a.png)\n")
    (src / "results.jsonl").write_text("{}\n")
    (src / "report.html").write_bytes(b"x" * 10)
    publish.publish(src, tmp_path / "small")
    assert (tmp_path / "small" / "report.html").is_file()
    assert "in [report.html](report.html)" in (tmp_path / "small" / "report.md").read_text()
    (src / "report.html").write_bytes(b"x" * (publish.HTML_LIMIT + 1))
    publish.publish(src, tmp_path / "large")
    assert not (tmp_path / "large" / "report.html").exists() and (tmp_path / "large" / "results.jsonl").is_file()
    assert "too large to commit" in (tmp_path / "large" / "report.md").read_text()


def test_a_tuning_study_without_a_report_is_published_with_its_records(tmp_path):
    publish = load_benchmark("publish_report")
    src = tmp_path / "tuning"
    (src / "pretrain" / "simclr_ebhi_1").mkdir(parents=True)
    (src / "pretrain" / "simclr_ebhi_1" / "stage.json").write_text("{}")
    (src / "results.jsonl").write_text("{}\n")
    (src / "config.yaml").write_text("name: t\n")
    (src / "subsets.json").write_text("{}")
    publish.publish(src, tmp_path / "docs")
    assert not (tmp_path / "docs" / "report.md").exists()
    assert {p.name for p in (tmp_path / "docs").rglob("*") if p.is_file()} == {"results.jsonl", "config.yaml", "subsets.json", "stage.json"}
    publish.restore(tmp_path / "docs", tmp_path / "restored")  # a study writes its subsets anew
    assert {p.name for p in (tmp_path / "restored").rglob("*") if p.is_file()} == {"results.jsonl", "config.yaml", "stage.json"}


def test_a_stage_stopped_while_trained_again_is_published_with_its_first_training(tmp_path):
    publish = load_benchmark("publish_report")
    stage = tmp_path / "study" / "pretrain" / "barlow_twins_ebhi_1_seed4"
    stage.mkdir(parents=True)
    (stage / "stage.first.json").write_text('{"epochs": 16}')
    (stage / "metrics.first.csv").write_text("epoch,pretext_loss\n0,9.5\n15,1.2\n")
    (stage / "metrics.csv").write_text("epoch,pretext_loss\n0,9.5\n")  # the retraining, stopped at its first epoch
    (tmp_path / "study" / "results.jsonl").write_text("{}\n")
    publish.publish(tmp_path / "study", tmp_path / "docs")
    published = tmp_path / "docs" / "pretrain" / stage.name
    assert (published / "stage.json").read_text() == '{"epochs": 16}'
    assert (published / "metrics.csv").read_text() == (stage / "metrics.first.csv").read_text()
