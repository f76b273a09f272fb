"""The suite fails when a test leaves a process running (tests stop what they start)."""

import shutil
import subprocess
import sys
from pathlib import Path

import psutil


def test_a_leaked_process_fails_the_session_and_is_stopped(tmp_path):
    # Prepare: a throwaway test directory with this suite's conftest and a test that leaks `sleep`
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    marker = tmp_path / "pid"
    (tmp_path / "test_leaks.py").write_text(
        "import subprocess\n"
        "def test_leaks():\n"
        f"    p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"    open({str(marker)!r}, 'w').write(str(p.pid))\n")
    # Execute
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # Assert: the test passed, the session failed, the process named and gone
    pid = int(marker.read_text())
    assert "1 passed" in proc.stdout
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "still running at the end" in proc.stdout and f"{pid} sleep 300" in proc.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
