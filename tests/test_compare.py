"""attnres-train-compare: the side-by-side table and the loss-curve PNG."""

import json

from attnres_train.compare import load_run, main


def _fake_run(path, residual, losses, vals, speed, mem):
    path.mkdir()
    (path / "config.yaml").write_text(f"model:\n  name: tiny\n  residual: {residual}\n")
    lines = []
    for step, loss in enumerate(losses, 1):
        rec = {"step": step, "loss": loss, "tokens_per_s": speed}
        if step in vals:
            rec["val_loss"] = vals[step]
        lines.append(json.dumps(rec))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (path / "summary.json").write_text(json.dumps({"peak_memory_bytes": mem}))


def test_compare_table_and_plot(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_run(a, "standard", [6.0, 5.0, 4.5, 4.4], {2: 5.2, 4: 4.8}, 1000.0, 2**30)
    _fake_run(b, "block", [6.0, 4.9, 4.4, 4.3], {2: 5.1, 4: 4.7}, 950.0, 2**30 + 2**20)
    run = load_run(b)
    assert run["final_val_loss"] == 4.7 and run["best_val_loss"] == 4.7 and run["steps"] == 4
    out_png = tmp_path / "curves.png"
    main([str(a), str(b), "--out", str(out_png)])
    text = capsys.readouterr().out
    assert "tiny/standard" in text and "tiny/block" in text
    assert "-0.1000" in text  # block's final val loss minus the baseline's
    assert "-5.0%" in text  # tokens/s relative to the first run
    assert out_png.stat().st_size > 1000
