"""What a new user sees first (issue 21): ``python -m hf_weyl --help`` is plain text, and the repository has the
Apache-2.0 LICENSE that pyproject declares and ships (the built wheel is checked by scripts/check_wheel.sh)."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_plain_text_starting_with_the_usage():
    proc = subprocess.run([sys.executable, "-m", "hf_weyl", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert out.startswith("usage: python -m hf_weyl SCRIPT [ARGS...]")
    assert "``" not in out and not re.search(r":(func|class|mod|meth|attr):`", out), out  # no reST markup
    assert "accelerate launch -m hf_weyl SCRIPT" in out and "torchrun" in out and "-m MODULE" in out


def test_license_file_is_the_apache_2_license_and_is_shipped():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text) > 11000  # the full text, not a notice
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
