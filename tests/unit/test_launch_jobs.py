"""`python -m llmtrain.launch status` over a damaged jobs file: entries it cannot read are skipped with one
warning line, a jobs file that is no file is one error line (SLURM's tools are stubbed: none answer)."""

import json

import pytest

from llmtrain.launch import jobs
from llmtrain.launch.__main__ import main

GOOD = {"job_id": "13", "name": "b", "run_dir": "/r", "log": "/r.out", "rank_logs": "/r/ranks"}


@pytest.fixture
def jobs_file(tmp_path, monkeypatch):
    path = tmp_path / "jobs.jsonl"
    monkeypatch.setenv("LLMTRAIN_JOBS_FILE", str(path))
    monkeypatch.setattr(jobs, "live_states", lambda ids: {})
    monkeypatch.setattr(jobs, "accounted_states", lambda ids: {})
    return path


def test_malformed_entries_are_skipped_with_one_warning_line(jobs_file, capsys):
    no_rank_logs = {k: v for k, v in GOOD.items() if k != "rank_logs"}
    lines = [json.dumps(no_rank_logs), "[1]", "", '{"job_id": "14", "na', json.dumps(GOOD)]
    jobs_file.write_text("\n".join(lines) + "\n")
    assert main(["status", "--all", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [row["job_id"] for row in json.loads(out)] == ["13"]
    assert err == (
        f"warning: {jobs_file}: skipped lines 1, 2, 4 (not a job entry with job_id, name, run_dir, log, "
        "rank_logs); delete or fix those lines\n"
    )


def test_a_jobs_file_that_is_a_directory_is_one_error_line(jobs_file, capsys):
    jobs_file.mkdir()
    assert main(["status"]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot read the jobs file {jobs_file} (Is a directory); point LLMTRAIN_JOBS_FILE at a file "
        "(default: $XDG_STATE_HOME/llmtrain/jobs.jsonl)\n"
    )


def test_a_job_that_cannot_be_recorded_is_a_warning_not_a_failed_submission(jobs_file, capsys):
    from types import SimpleNamespace

    jobs_file.mkdir()
    sub = SimpleNamespace(
        job_id="15", name="c", run_dir="/r", log="/r.out", rank_logs="/r/ranks", script="/s"
    )
    jobs.record(sub, ["train.steps=2"])
    assert capsys.readouterr().err == (
        f"warning: cannot record job 15 in {jobs_file} (Is a directory); `python -m llmtrain.launch status` "
        "will not list it (point LLMTRAIN_JOBS_FILE at a writable file)\n"
    )
