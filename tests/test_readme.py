"""README opens with the two commands, and CI runs the second one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current).strip())
        elif inside:
            current.append(line)
    return blocks


def test_readme_starts_with_install_and_test_commands():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    main_cmd, test_cmd = blocks[0], blocks[1]
    assert main_cmd.startswith("pip install")
    assert "superexperts demo" in main_cmd or "examples/" in main_cmd
    assert "pytest" in test_cmd


def test_ci_runs_readme_test_command():
    test_cmd = _bash_blocks((ROOT / "README.md").read_text())[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
