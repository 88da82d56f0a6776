"""study.py: every member of the table builds and trains 2 steps; the correlation table, the recon control and
the resume of a finished member."""
import json

import numpy as np
import pytest

import study
import train_tokenizer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    import proxy
    path = str(tmp_path_factory.mktemp("t") / "teacher.pt")
    proxy.main(["--steps", "2", "--batch_size", "8", "--width", "8", "--num_workers", "0", "--out", path])
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mid", sorted(study.MEMBERS))
def test_each_member_builds_and_trains_two_steps(mid, teacher, tmp_path):
    flags = [f.format(teacher=teacher) for f in study.MEMBERS[mid][2]]
    train_tokenizer.main(flags + ["--perceptual_weight", "0", "--max_steps", "2", "--global_batch_size", "4",
                                  "--warmup_steps", "1", "--builtin_size", "16", "--eval_every", "2",
                                  "--eval_images", "8", "--grid_every", "-1", "--log_every", "1", "--num_workers", "0",
                                  "--results_dir", str(tmp_path)])
    log = open(next(tmp_path.glob("*/log.txt"))).read()
    assert "step 2" in log or "held-out PSNR" in log


def test_correlation_table_recon_control_and_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for i, m in enumerate(sorted(study.MEMBERS)):
        viv = 0.2 + 0.05 * i
        rows.append({"id": m, "what": m, "psnr": 25.0 - (5.0 if m == "A5" else 0.1 * i), "proxy_rfid": 10.0,
                     "gfid": 10 + 20 * viv + rng.normal(0, 0.1), "gfid_cfg": 5 + 10 * viv, "viv_norm": viv,
                     "lnc": 1 - viv, "linear_probe_accuracy": 0.9 - viv})
    args = study.parse_args(["--out", str(tmp_path), "--bootstrap", "200"])
    table, excluded = study.correlate(rows, "gfid", args)
    assert excluded == ["A5"]                                              # 5 dB under the median PSNR
    assert table["viv_norm"]["controlled"]["n"] == 8 and table["viv_norm"]["all"]["n"] == 9
    assert table["viv_norm"]["controlled"]["pearson"] > 0.99 and table["lnc"]["controlled"]["spearman"] < -0.99
    lo, hi = table["viv_norm"]["controlled"]["pearson_ci"]
    assert lo <= table["viv_norm"]["controlled"]["pearson"] <= hi
    text = study.markdown(rows, table, excluded, "gfid", args)
    assert "| viv_norm | + |" in text and "A5" in text.splitlines()[0]
    study.scatter(rows, table, "gfid", str(tmp_path / "s.png"))
    (tmp_path / "A1").mkdir()
    (tmp_path / "A1" / "summary.json").write_text(json.dumps(rows[0]))
    assert study.member(args, "A1", {}, 1, 1) == rows[0]                   # finished: skipped, nothing run
    assert "done before" in capsys.readouterr().out
