"""metrics.jsonl: a resumed run drops the rows logged after its checkpoint, keeps the rest."""
import json

from stem_jax.writer import MetricsWriter


def test_resume_drops_rows_after_the_checkpoint_step(tmp_path):
    w = MetricsWriter(tmp_path)
    for step in range(1, 8):
        w.write(step, {"loss": 10.0 - step})
    w.write(7, {"val_loss": float("nan")})
    w.close()
    w = MetricsWriter(tmp_path, start_step=4)
    assert [r["step"] for r in w.rows()] == [1, 2, 3, 4]
    w.write(5, {"loss": 5.0})
    w.close()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 5.0)]
    assert MetricsWriter(tmp_path, start_step=0).rows() == []  # a run that restarts from scratch
