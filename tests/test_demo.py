"""The offline demo the README promises works from a fresh folder."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_offline_and_shows_saved_refused_and_replies(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "demo.py")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-> 401 invalid signature" in out and "-> 200 duplicate" in out
    for name in ("Quarterly report.pdf", "Überweisung März ✓.csv", "photos.zip", "bashrc"):
        assert (tmp_path / "demo-output" / "downloads" / name).is_file()
    assert "blocked: Webex flagged it as infected" in out and "[untrusted_host]" in out
    assert out.count("  to ROOM-") == 6
