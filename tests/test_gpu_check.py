"""scripts/gpu_check.sh, the check a person with one GPU runs as-is: on CPU, its dry run lists every check, and
every flag its Python commands pass exists in that script's --help (a renamed flag fails here, not on the GPU)."""
import shlex
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_dry_run_lists_the_checks_with_flags_the_scripts_accept():
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(line[2:]) for line in r.stdout.splitlines() if line.startswith("+ ")]
    scripts = [c[1] if c[1] != "-m" else c[2] for c in cmds]
    assert scripts == ["pytest", "proxy.py", "-c", "train_tokenizer.py", "train_tokenizer.py", "train_tokenizer.py",
                       "train_tokenizer.py", "evaluate.py", "bench.py"]
    stages = [c[c.index("--stage") + 1] for c in cmds if "--stage" in c]
    assert stages == ["scratch", "perceptual"] and sum("--compile" in c for c in cmds) == 1
    helps = {}
    for c in cmds:
        if not c[1].endswith(".py"):
            continue
        head = c[1:3] if c[1] == "evaluate.py" else c[1:2]                 # evaluate.py's subcommand
        key = " ".join(head)
        if key not in helps:
            h = subprocess.run([sys.executable, *head, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert h.returncode == 0, h.stderr
            helps[key] = h.stdout
        for flag in (a for a in c if a.startswith("--")):
            assert flag in helps[key], (key, flag)


def test_gpu_check_refuses_a_machine_without_a_gpu(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                                                   "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 1 and "no CUDA GPU visible" in r.stderr
