"""The README and docs/ cannot drift from the code: every command in their bash blocks names a script that exists
and only flags that script's argparse has, and no document depends on files outside the repository."""
import re
import shlex
import subprocess
import sys

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SUBCOMMANDS = {"evaluate.py"}  # scripts whose first argument chooses a parser


def commands(path):
    """(line, argv) of every python / torchrun / bash command in the markdown file's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            argv = []
            for tok in shlex.split(line) + [";"]:  # quoted "$(... | ...)" stays one token
                if tok in ("&&", ";", "|", "||"):
                    if argv and argv[0] in ("python", "python3", "torchrun", "bash"):
                        out.append((line, argv))
                    argv = []
                else:
                    argv.append(tok)
    return out


def script_of(argv):
    """(script, its arguments) of a command: the first .py / .sh after the launcher's own flags."""
    for i, a in enumerate(argv[1:], 1):
        if a.endswith((".py", ".sh")):
            return a, argv[i + 1:]
    return None, []


def test_every_documented_command_uses_existing_scripts_and_flags():
    helps, checked = {}, 0
    for doc in DOCS:
        for line, argv in commands(doc):
            script, args = script_of(argv)
            if script is None:                                                # python -m pytest, python -c
                continue
            assert (ROOT / script).exists(), f"{doc.name}: {line}: no {script}"
            if script.endswith(".sh"):
                text = (ROOT / script).read_text()
                assert all(f in text for f in args if f.startswith("--")), f"{doc.name}: {line}"
                continue
            head = [script] + (args[:1] if script in SUBCOMMANDS and args else [])
            key = " ".join(head)
            if key not in helps:
                r = subprocess.run([sys.executable, *head, "--help"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120)
                assert r.returncode == 0, f"{key} --help: {r.stderr[-500:]}"
                helps[key] = set(re.findall(r"--[a-z0-9_]+", r.stdout))
            for flag in (a.split("=")[0] for a in args if a.startswith("--")):
                assert flag in helps[key], f"{doc.name}: `{line}`: {key} has no {flag}"
            checked += 1
    assert checked > 20


def test_no_document_or_code_depends_on_files_outside_the_repository():
    files = DOCS + [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("experiments/*"), ROOT / "quickstart.sh",
                    *ROOT.glob("scripts/*")]
    outside = re.compile("|".join([r"\.\./" + "shared", "wave2" + "-spec"]))  # not spelled out: grep finds none
    bad = [f.name for f in files if outside.search(f.read_text())]
    assert not bad, bad


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 2500
    lines = text.splitlines()[:80]
    for heading in ("## Install", "## Quick start", "## Tests"):
        assert heading in lines, heading


def test_the_modules_import_each_other_without_a_cycle():
    """Every import between the project's modules, at the top or inside a function, forms a graph without cycles;
    and no script imports another script."""
    import ast
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module.split(".")[0])
        graph[name] = sorted(d for d in deps if d in modules and d != name)
    scripts = {"train_tokenizer", "train_diffusion", "cache_latents", "sample", "evaluate", "study", "bench",
               "proxy"}
    assert not [(m, d) for m in scripts for d in graph[m] if d in scripts - {"proxy"}], graph
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            assert state.get(d) != "open", f"import cycle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_tokenizer_training_step_is_written_out_in_the_loop():
    """train_tokenizer.py's step (next batch -> losses -> backward -> clip -> optimizer -> EMA -> the D step) is
    inline in main's loop: no function or lambda is defined inside it."""
    import ast
    tree = ast.parse((ROOT / "train_tokenizer.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    loop = next(n for n in ast.walk(main) if isinstance(n, ast.While))
    nested = [n for n in ast.walk(loop) if isinstance(n, (ast.FunctionDef, ast.Lambda))]
    assert not nested and "ema_update" in ast.unparse(loop) and "next(stream)" in ast.unparse(loop)


def test_the_quick_start_passes_only_flags_its_scripts_have():
    """quickstart.sh keeps each mode's flags in bash arrays (TOK_FLAGS, ...), outside any documented command."""
    text = (ROOT / "quickstart.sh").read_text()
    for name, head in (("TOK_FLAGS", ["train_tokenizer.py"]), ("DIT_FLAGS", ["train_diffusion.py"]),
                       ("LATENT_FLAGS", ["evaluate.py", "latent"])):
        arrays = re.findall(rf"^\s*{name}=\((.*?)\)", text, flags=re.M | re.S)
        flags = set(re.findall(r"--[a-z0-9_]+", " ".join(arrays)))
        assert len(arrays) == 2 and flags, name                             # the default and --full
        r = subprocess.run([sys.executable, *head, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert flags <= set(re.findall(r"--[a-z0-9_]+", r.stdout)), (name, flags)
    r = subprocess.run(["bash", str(ROOT / "quickstart.sh"), "--ful"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "usage: bash quickstart.sh [--full]" in r.stderr
