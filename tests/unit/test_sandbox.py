"""The Python sandbox contains what untrusted code tries, and says what happened."""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from rlflow.agents import sandbox_child
from rlflow.agents.python_tool import observation, python
from rlflow.agents.sandbox import SandboxLimits, run_python
from rlflow.rewards.guarded import ScoreTimeout, call_with_timeout

SMALL = SandboxLimits(cpu_time_s=2, wall_time_s=2)
# How much later than its wall limit a run may return on a loaded machine.
SLACK_S = 3.0
IS_ROOT = os.geteuid() == 0
CHILD_SCRIPT = os.path.abspath(sandbox_child.__file__)


def live_processes_with(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``text``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and text in cmdline:
            found.append(int(name))
    return found


def test_normal_program_returns_its_stdout_and_reads_stdin():
    result = run_python("import sys\nprint('hello', sys.stdin.read().upper())", stdin="abc", limits=SMALL)
    assert result.status == "ok" and result.ok
    assert result.returncode == 0
    assert result.stdout == "hello ABC\n"
    assert result.stderr == ""
    assert result.wall_s < SMALL.wall_time_s


def test_exception_is_an_error_with_a_traceback_naming_the_code():
    result = run_python("def f():\n    return 1 / 0\nf()", limits=SMALL)
    assert result.status == "error" and result.returncode == 1
    assert 'File "main.py", line 2, in f' in result.stderr
    assert "ZeroDivisionError" in result.stderr
    assert "sandbox_child" not in result.stderr  # the harness's own frame is left out


def test_runs_in_a_private_directory_that_is_removed_with_no_inherited_environment(monkeypatch):
    monkeypatch.setenv("RLFLOW_TEST_SECRET", "do-not-leak")
    code = "import os\nprint(os.getcwd())\nprint(os.environ.get('RLFLOW_TEST_SECRET'))\nprint(os.getuid())"
    result = run_python(code, limits=SMALL)
    workdir, secret, uid = result.stdout.split()
    assert result.status == "ok"
    assert os.path.basename(workdir).startswith("rlflow-sandbox-")
    assert not os.path.exists(workdir)
    assert secret == "None"
    if IS_ROOT:  # root hands the code an unprivileged uid of its own
        assert int(uid) != 0 and "uid" in result.isolation


def test_infinite_loop_times_out_at_the_wall_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", limits=SandboxLimits(cpu_time_s=30, wall_time_s=1.5))
    assert result.status == "timeout"
    assert time.monotonic() - start < 1.5 + SLACK_S


def test_cpu_limit_ends_a_busy_loop_before_the_wall_limit():
    result = run_python("while True:\n    pass", limits=SandboxLimits(cpu_time_s=1, wall_time_s=20))
    assert result.status == "timeout"
    assert result.wall_s < 10  # RLIMIT_CPU, not the 20 s wall clock, stopped it


def test_sleeping_code_times_out_on_the_wall_clock():
    result = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(cpu_time_s=1, wall_time_s=1))
    assert result.status == "timeout"
    assert result.wall_s < 1 + SLACK_S


def test_memory_hog_is_reported_as_memory():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))", limits=SMALL)
    assert result.status == "memory"
    assert "MemoryError" in result.stderr


def test_huge_print_stops_at_the_output_limit():
    limits = SandboxLimits(cpu_time_s=2, wall_time_s=2, max_output_bytes=4096)
    result = run_python("while True:\n    print('x' * 1000)", limits=limits)
    assert result.status == "output_limit"
    assert 0 < len(result.stdout) <= 4096
    assert result.wall_s < 2


def test_large_output_under_the_limit_is_read_whole():
    # More than a pipe buffer holds, on both streams: reading them together cannot deadlock.
    code = "import sys\nsys.stderr.write('e' * 200000)\nprint('o' * 200000)"
    result = run_python(code, limits=SandboxLimits(max_output_bytes=300000))
    assert result.status == "ok"
    assert result.stdout == "o" * 200000 + "\n" and result.stderr == "e" * 200000


@pytest.mark.parametrize("where", ["/tmp", "/etc"])
def test_write_outside_the_directory_is_blocked(where):
    target = os.path.join(where, f"rlflow-sandbox-test-{secrets.token_hex(8)}")
    result = run_python(f"open({target!r}, 'w').write('escaped')", limits=SMALL)
    try:
        assert result.status == "blocked"
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.symlink('/etc/passwd', 'link')\nopen('link', 'a').write('x')",
        "import os\nos.remove('/etc/hostname')",
        "import os\nos.rename('/etc/hostname', 'stolen')",
        "import os\nos.system('true')",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.kill(os.getppid(), 9)",
    ],
)
def test_other_escapes_are_blocked(code):
    assert run_python(code, limits=SMALL).status == "blocked"


def test_writes_inside_the_directory_are_allowed():
    code = (
        "import os, shutil, tempfile\n"
        "os.mkdir('d')\nopen('d/f', 'w').write('x')\nos.rename('d/f', 'd/g')\nshutil.rmtree('d')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\n"
        "open('/dev/null', 'w').write('z')\nprint('done')"
    )
    result = run_python(code, limits=SMALL)
    assert result.status == "ok", result.stderr
    assert result.stdout == "done\n"


@pytest.mark.skipif(not IS_ROOT, reason="the uid switch happens only when started as root")
def test_without_the_guard_the_uid_switch_still_protects_system_files():
    target = f"/etc/rlflow-sandbox-test-{secrets.token_hex(8)}"
    result = run_python(f"open({target!r}, 'w').write('escaped')", limits=SMALL, guard=False)
    assert result.status == "error" and "PermissionError" in result.stderr
    assert not os.path.exists(target)


@pytest.mark.parametrize("guard", [True, False])
def test_network_connection_to_a_listening_socket_is_contained(guard):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'hi')"
        result = run_python(code, limits=SMALL, guard=guard)
        if not guard and "netns" not in result.isolation:
            pytest.skip("this kernel refuses a new network namespace: only the guard blocks the network")
        assert result.status == ("blocked" if guard else "error")
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()


def test_fork_is_blocked_by_the_guard():
    result = run_python("import os\nwhile True:\n    os.fork()", limits=SMALL)
    assert result.status == "blocked"


def test_fork_bomb_without_the_guard_is_contained_by_the_os_limits():
    code = (
        "import os\nprint(os.getcwd(), flush=True)\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    )
    start = time.monotonic()
    result = run_python(code, limits=SMALL, guard=False)
    assert time.monotonic() - start < SMALL.wall_time_s + SLACK_S
    assert result.status in ("timeout", "error")
    workdir = result.stdout.split()[0]  # each forked copy runs with it on its command line
    assert live_processes_with(workdir) == []


@pytest.mark.parametrize(
    "leave",
    [
        pytest.param("while True:\n    pass", id="parent-times-out"),
        pytest.param("", id="parent-exits"),
    ],
)
@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "own-session"])
def test_child_process_left_running_is_killed(leave, new_session):
    if new_session and not IS_ROOT:
        pytest.skip("a child that leaves the process group is swept by the run's own uid (root only)")
    token = f"{1000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    code = (
        "import subprocess\n"
        f"child = subprocess.Popen(['sleep', {token!r}], start_new_session={new_session})\n"
        "print(child.pid, flush=True)\n" + leave
    )
    result = run_python(code, limits=SMALL, guard=False)
    assert result.status == ("timeout" if leave else "ok")
    assert result.stdout.strip().isdigit()  # the child did start
    assert live_processes_with(f"sleep {token}") == []


def test_an_interrupted_run_leaves_nothing_behind():
    # The reward worker's alarm may stop a run half-way: its processes must still go.
    token = f"{1000 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    code = f"import subprocess\nsubprocess.Popen(['sleep', {token!r}])\nwhile True:\n    pass"
    limits = SandboxLimits(cpu_time_s=30, wall_time_s=30)
    with pytest.raises(ScoreTimeout):
        call_with_timeout(lambda: run_python(code, limits=limits, guard=False), {}, 1.0)
    assert live_processes_with(f"sleep {token}") == []
    assert live_processes_with(CHILD_SCRIPT) == []


# --------------------------------------------------------------------------- python tool


def test_python_tool_has_a_json_schema():
    utils = pytest.importorskip("transformers.utils")
    schema = utils.get_json_schema(python)
    assert schema["function"]["name"] == "python"
    assert schema["function"]["parameters"]["required"] == ["code"]
    assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"


def test_python_tool_observations():
    assert python("print(6 * 7)") == "42\n"
    assert python("x = 1") == "(no output)"
    assert "ZeroDivisionError" in python("1 / 0")
    assert python("import os\nos.system('ls')").startswith("blocked: os.system")
    slow = run_python("while True:\n    pass", limits=SandboxLimits(wall_time_s=1))
    assert observation(slow).startswith("timeout")
