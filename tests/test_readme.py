"""The README's commands point at things that exist, and the scripts behind them behave."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def test_exactly_two_setup_commands_and_their_scripts_exist():
    setup = _section("Set up and run (fresh machine)")
    first_block = re.search(r"```bash\n(.*?)```", setup, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup_env.sh", "scripts/demo.py"):
        assert (ROOT / script).is_file(), script
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci and "scripts/test.sh" in ci
    for script in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup_env.sh", ".ci/run"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0, f"{script}: bash syntax error"


def test_install_puts_torch_first_and_test_script_fails_on_no_tests():
    setup = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert setup.index('"${torch_args[@]}"') < setup.index('-e ".[$EXTRAS]"')
    for knob in ("TORCH_SPEC", "PIP_TORCH_INDEX", "EXTRAS", "VENV", "SKIP_INSTALL", "FORCE_INSTALL"):
        assert knob in setup and f"`{knob}`" in README
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert '"$rc" -eq 5' in test_sh and "exit 1" in test_sh


def test_readme_names_only_modules_and_files_that_exist():
    for module in sorted(set(re.findall(r"python -m ([a-z_][\w.]*)", README))):
        path = ROOT / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), f"README runs missing {module}"
    for name in sorted(
        set(re.findall(r"\b((?:scripts|stage2_train|stage1_encode|shared|pipeline)/[\w/]+\.(?:py|sh))", README))
    ):
        assert (ROOT / name).is_file(), f"README names missing {name}"


def test_demo_dry_run_lists_every_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for step in ("corpus", "models", "encode", "train", "inspect", "loss"):
        assert re.search(rf"^  {step}\s+(ok \(dry run\)|NOT BUILT YET|skipped)", out.stdout, flags=re.M), out.stdout
    assert "-m stage1_encode.demo_corpus" in out.stdout


def test_demo_loss_plot(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "loss": {1.0 / s}, "mse": {0.9 / s}}}\n' for s in (10, 20, 30)))
    demo.plot_loss(metrics, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_design_map_names_only_what_exists():
    """docs/design.md: every file of its layout exists in its package, and every class, function and constant it
    names (CamelCase, UPPER_CASE, `def name(` / `name(`) is defined or used somewhere in the code."""
    design = (ROOT / "docs" / "design.md").read_text()
    layout = re.search(r"## Layout\n+```\n(.*?)```", design, flags=re.S).group(1)
    package = None
    for line in layout.splitlines():
        m = re.match(r"^([a-z_0-9]+)/\s", line)
        if m:
            package = m.group(1)
            continue
        entry = re.match(r"^  (\S.*?)(?:\s{2,}|$)", line)
        if package and entry:
            for name in re.findall(r"[\w.]+\.py", entry.group(1)):
                assert (ROOT / package / name).is_file(), f"design.md lists {package}/{name}, which does not exist"
    code = "\n".join(
        p.read_text() for d in ("pipeline", "shared", "stage1_encode", "stage2_train") for p in (ROOT / d).glob("*.py")
    )
    names = set(re.findall(r"\b(?:[A-Z][a-z0-9]+){2,}\w*\b|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", design))
    names |= set(re.findall(r"\b(?:def|class) (\w+)", design)) | set(re.findall(r"\b([a-z]\w*_\w+)\(", design))
    missing = sorted(n for n in names if not re.search(rf"\b{re.escape(n)}\b", code))
    assert not missing, f"docs/design.md names what the code does not have: {missing}"
