"""``tntsearch``: lists its commands without importing the heavy libraries, and each command
is exactly ``python -m tntsearch.X`` (same help, same exit code)."""
from __future__ import annotations

import subprocess
import sys

from tntsearch.cli import COMMANDS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_and_imports_nothing_heavy():
    code = ("import sys; from tntsearch.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    print('rc', e.code)\n"
            "print('heavy', sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules))")
    out = _run("-c", code).stdout
    assert all(f"    {name} " in out for name in COMMANDS), out
    assert "rc 0" in out and "heavy []" in out


def test_a_command_is_its_module():
    ours = _run("-c", "import sys; from tntsearch.cli import main; sys.exit(main(['data', '--help']))")
    theirs = _run("-m", "tntsearch.data", "--help")
    assert ours.returncode == theirs.returncode == 0 and ours.stdout == theirs.stdout
    bad = _run("-c", "import sys; from tntsearch.cli import main; sys.exit(main(['data', 'convert', 'nowhere', 'x.beton']))")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")  # the module's own error and code
    unknown = _run("-c", "import sys; from tntsearch.cli import main; sys.exit(main(['nope']))")
    assert unknown.returncode == 2 and "invalid choice: 'nope'" in unknown.stderr
