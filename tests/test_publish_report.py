"""benchmarks/publish_report.py: a report.html over the size limit stays out of docs/, and report.md says where it is."""

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
    publish.publish(src, tmp_path / "docs")
    assert not (tmp_path / "docs" / "report.md").exists()
    assert {p.name for p in (tmp_path / "docs").rglob("*") if p.is_file()} == {"results.jsonl", "config.yaml", "stage.json"}
