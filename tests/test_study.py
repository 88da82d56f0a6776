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
    # width 16: AlignTok-tiny's encoder is this proxy's trunk (64 channels)
    proxy.main(["--steps", "2", "--batch_size", "8", "--width", "16", "--num_workers", "0", "--out", path])
    return path


def _train_two_steps(mid, paths, out, folder):
    train_tokenizer.main(study.member_flags(mid, paths, str(out)) + [
        "--perceptual_weight", "0", "--max_steps", "2", "--global_batch_size", "4", "--warmup_steps", "1",
        "--builtin_size", "16", "--eval_every", "2", "--eval_images", "8", "--grid_every", "-1", "--log_every", "1",
        "--num_workers", "0", "--results_dir", str(folder)])
    return open(next(folder.glob("*/log.txt"))).read()


@pytest.mark.slow
@pytest.mark.parametrize("mid", sorted(study.MEMBERS))
def test_each_member_builds_and_trains_two_steps(mid, teacher, tmp_path):
    paths = {"teacher": teacher}
    if mid in study.PARENTS:  # a later stage: its parent member's tokenizer first, where member() puts it
        _train_two_steps(study.PARENTS[mid], paths, tmp_path, tmp_path / study.PARENTS[mid] / "tok")
    log = _train_two_steps(mid, paths, tmp_path, tmp_path / "run")
    assert "step 2" in log or "held-out PSNR" in log


def test_members_of_a_later_stage_need_their_parent_first():
    with pytest.raises(SystemExit):
        study.parse_args(["--members", "B3,B2"])
    assert study.parse_args(["--members", "B2,B3"]).members == ["B2", "B3"]


def test_correlation_table_recon_control_and_resume(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for i, m in enumerate(m for m in sorted(study.MEMBERS) if m.startswith("A")):
        viv = 0.2 + 0.05 * i
        rows.append({"id": m, "family": "A", "what": m, "psnr": 25.0 - (5.0 if m == "A5" else 0.1 * i), "proxy_rfid": 10.0,
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
    import torch
    from proxy import ProxyConfig, ProxyNet
    paths = {}
    for key, seed in (("proxy", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        paths[key] = str(tmp_path / f"{key}.pt")
        torch.save({"model": ProxyNet(ProxyConfig(width=4)).state_dict()}, paths[key])
    (tmp_path / "A1").mkdir()
    done = {**rows[0], "proxy_digest": study.digest(paths["proxy"]), "teacher_digest": study.digest(paths["teacher"])}
    (tmp_path / "A1" / "summary.json").write_text(json.dumps(done))
    assert study.member(args, "A1", paths, 1, 1) == done                   # finished: skipped, nothing run
    assert "done before" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other proxies"):                 # scored by another study's proxies
        study.member(args, "A1", {**paths, "proxy": paths["teacher"]}, 1, 1)


def test_main_correlates_within_each_family(tmp_path, monkeypatch):
    fake = {m: {"id": m, "family": m[0], "what": m, "psnr": 20.0, "proxy_rfid": 1.0, "gfid": 10.0 + i * (1 + (m[0] == "B")),
                "gfid_cfg": 5.0 + i, "viv_norm": 0.1 * i, "lnc": 0.5, "linear_probe_accuracy": 0.3 + 0.01 * i * i}
            for i, m in enumerate(sorted(study.MEMBERS))}
    for m in fake:                                                         # a grid-only metric: family B has it
        if m[0] == "B":
            fake[m]["lds"] = 1.0 - 0.1 * int(m[1:])
    monkeypatch.setattr(study, "shared", lambda args: {})
    monkeypatch.setattr(study, "member", lambda args, m, paths, k, n: fake[m])
    study.main(["--out", str(tmp_path), "--bootstrap", "50", "--members", "A1,A2,A3,B1,B2,B3"])
    rep = json.load(open(tmp_path / "study.json"))
    assert rep["A"]["gfid"]["table"]["viv_norm"]["all"]["n"] == 3 and rep["B"]["gfid"]["table"]["viv_norm"]["all"]["n"] == 3
    assert "lds" in rep["B"]["gfid"]["table"] and "lds" not in rep["A"]["gfid"]["table"]
    assert rep["B"]["gfid"]["table"]["lds"]["all"]["spearman"] < -0.99   # smoother grid, lower gFID here
    assert (tmp_path / "scatter_B_gfid.png").exists() and "family B, 3 tokenizers" in (tmp_path / "study.md").read_text()


def test_the_proxy_never_runs_under_the_launcher(tmp_path, monkeypatch):
    """study.py --launcher torchrun: every script of the chain under torchrun, but proxy.py under plain python (8
    ranks would race on one file); proxy.py itself refuses a world size above one."""
    import subprocess
    import sys
    import proxy
    cmds = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    args = study.parse_args(["--launcher", "torchrun --nproc_per_node=8", "--out", str(tmp_path)])
    study.run(args, "proxy.py", "--steps", "1", log=str(tmp_path / "log"))
    study.run(args, "train_tokenizer.py", "--max_steps", "1", log=str(tmp_path / "log"))
    assert cmds[0][:2] == [sys.executable, "proxy.py"] and cmds[1][:3] == ["torchrun", "--nproc_per_node=8",
                                                                           "train_tokenizer.py"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit, match="trains on one process"):
        proxy.main(["--steps", "1"])
