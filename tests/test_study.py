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


# each distinct recipe once (family R's mask ratios differ from A2's in numbers only: R5 stands for them below)
TRAINED = {tuple(f): m for m, (_, _, f) in reversed(study.MEMBERS.items()) if f is not None and m[0] != "R"}


@pytest.mark.slow
@pytest.mark.parametrize("mid", sorted(TRAINED.values()))
def test_each_member_builds_and_trains_two_steps(mid, teacher, tmp_path):
    paths = {"teacher": teacher}
    if mid in study.PARENTS:  # a later stage: its parent member's tokenizer first, where member() puts it
        _train_two_steps(study.PARENTS[mid], paths, tmp_path, tmp_path / study.PARENTS[mid] / "tok")
    log = _train_two_steps(mid, paths, tmp_path, tmp_path / "run")
    assert "step 2" in log or "held-out PSNR" in log


def test_family_r_trains_its_two_stages_and_keeps_a_psnr_band(tmp_path):
    log = _train_two_steps("R5", {}, tmp_path, tmp_path / "tok")            # mask 0.6-0.75 + HOG, 2 steps
    args = study.parse_args(["--family", "R", "--dec_steps", "2", "--out", str(tmp_path)])
    assert args.members == [f"R{i}" for i in range(1, 13)] and "held-out PSNR" in log
    tok = study.finished(str(tmp_path / "tok"), 2)
    train_tokenizer.main(study.decoder_stage_flags(args, tok, str(tmp_path / "dec")) + [
        "--global_batch_size", "4", "--builtin_size", "16", "--eval_images", "8", "--num_workers", "0"])
    dec = study.finished(str(tmp_path / "dec"), 2)
    assert study.finished(str(tmp_path / "dec"), 300) is None             # another length: not this call's run
    text = open(dec + "log.txt").read()
    assert "decoder_finetune" in text and study.last_eval_psnr(dec) is not None
    # the recon control of family R: two-sided, +-1 dB around the median PSNR (A / B: one-sided, 2 dB under)
    rows = [{"id": f"R{i}", "family": "R", "what": "", "psnr": p, "proxy_rfid": 10.0 + i, "gfid": 20.0 + i,
             "gfid_cfg": 10.0 + i, "viv_norm": 0.1 * i, "lnc": 0.5 - 0.01 * i, "linear_probe_accuracy": 0.3}
            for i, p in enumerate([25.0, 25.5, 24.6, 26.4, 23.4, 25.2], 1)]
    table, excluded = study.correlate(rows, "gfid", args)
    assert excluded == ["R4", "R5"] and table["viv_norm"]["controlled"]["n"] == 4
    assert "more than 1 dB from the median" in study.markdown(rows, table, excluded, "gfid", args)


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
    args = study.parse_args(["--out", str(tmp_path), "--bootstrap", "200", "--family", "A"])
    table, excluded = study.correlate(rows, "gfid", args)
    assert excluded == ["A5"]                                              # 5 dB under the median PSNR
    c = {k: table[k]["controlled"] for k in study.PRIMARY}
    assert c["viv_norm"]["n"] == 8 and table["viv_norm"]["all"]["n"] == 9
    assert c["viv_norm"]["pearson"] > 0.99 and c["lnc"]["spearman"] < -0.99
    assert c["viv_norm"]["pearson_p"] < 1e-3 and "pearson_ci" not in c["viv_norm"]  # no bootstrap under n = 10
    assert c["viv_norm"]["partial_r"] is None                               # rFID is the same for all
    assert all(e["pearson_p_holm"] >= e["pearson_p"] and e["verdict"] == "reproduces" for e in c.values())
    text = study.markdown(rows, table, excluded, "gfid", args)
    assert "| viv_norm | + |" in text and "A5" in text.splitlines()[0] and "one denoiser seed" in text
    # the rules fixed in advance: the paper's sign, Holm p < 0.05, and a partial r given rFID that keeps the sign
    e = {"n": 8, "pearson": 0.9, "pearson_p_holm": 0.01, "partial_r": -0.2}
    assert study.verdict(e, "+", 3, args) == "does not reproduce (sign lost given rFID)"
    assert study.verdict({**e, "partial_r": 0.5}, "-", 3, args) == "does not reproduce (opposite sign)"
    assert study.verdict({**e, "pearson_p_holm": 0.2}, "+", 3, args) == "does not reproduce (not significant)"
    assert study.verdict({**e, "n": 4}, "+", 3, args).startswith("not tested")
    fixed = [{**r, "family": "F", "id": f"F{i:02d}", "psnr": 25.0, "proxy_rfid": 20.0} for i, r in enumerate(rows)]
    f_table, _ = study.correlate(fixed, "gfid", args)                      # family F: rFID fixed, the probe invariant
    assert f_table["viv_norm"]["controlled"]["partial_r"] is None and "psnr" not in f_table
    assert f_table["linear_probe_accuracy"]["controlled"]["verdict"].startswith("not tested (invariant")
    assert f_table["lnc"]["controlled"]["pearson_p_holm"] <= 2 * f_table["lnc"]["controlled"]["pearson_p"]  # m = 2
    for r, s0 in zip(rows, rng.normal(0, 1, len(rows))):                   # two seeds: the noise floor
        r["gfid_seeds"] = [r["gfid"] + s0, r["gfid"] - s0]
    nf = study.noise_floor(rows, "gfid")
    assert nf["seeds"] == 2 and 0.3 < nf["within_sd"] < 3 and "Seed noise floor" in study.markdown(
        rows, table, excluded, "gfid", args)
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
    assert study.parse_args(["--family", "A,B"]).members == [m for m in study.MEMBERS if m[0] in "AB"]
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


@pytest.mark.slow
def test_a_grid_member_is_its_base_through_a_spatial_map(tmp_path):
    """Family G's chain as member() runs it: the base (B1's grid, the monitor on) trained and cached once, then a
    member's mapped tokenizer, which keeps the grid and reconstructs exactly as the base."""
    import torch
    import released
    import tokenizer
    args = study.parse_args(["--family", "G", "--out", str(tmp_path), "--tok_steps", "2", "--builtin_size", "64",
                             "--cache_images", "32", "--monitor_every", "2", "--num_workers", "0"])
    assert args.members[0] == "G1" and len(args.members) == 6
    base = study.fixed_base(args, "G")
    tok_path, z, y = base
    assert z.shape == (32, 64, 8) and len(y) == 32                      # AlignTok-tiny: an 8 x 8 x 8 grid
    assert "monitor_lnc" in open(tok_path + "metrics.jsonl").read()
    path = str(tmp_path / "G3.pt")
    study.mapped_tokenizer(args, "G3", base, path)                          # blur 0.8
    tok, ref = (tokenizer.from_checkpoint(released.load(p)) for p in (path, tok_path))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        v, z0 = tok.encode(x), ref.encode(x)
        assert tok.grid == (8, 8) and (tok.decode(v) - ref.decode(z0)).abs().max() < 1e-5
    assert (v - z0).abs().max() > 1e-2
