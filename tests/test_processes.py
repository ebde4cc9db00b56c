"""common/processes.py: background processes in groups of their own (start, port wait, stop), pid
files, the flwr CLI's connection file, and --set/--node-config values read as Flower reads them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import parse_config_args

from common.processes import ProcessStartError, free_port, parse_assignments, pid_alive, start_in_group, stop_group, \
    wait_for_port, write_flwr_connection, write_pid_file
from server.centre import CONNECTION, Centre, write_connection


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# A leader that ignores SIGTERM and a worker it spawns (in its group) that ignores it too: only the
# SIGKILL that follows reaches them. The worker's pid is printed first, then the leader listens.
STUBBORN = """
    import signal, socket, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN); time.sleep(600)"])
    print(worker.pid, flush=True)
    server = socket.socket(); server.bind(("127.0.0.1", int(sys.argv[1]))); server.listen()
    time.sleep(600)
"""


def _ends(pid: int, timeout: float = 30.0) -> bool:
    """Whether ``pid`` ends within ``timeout``: a SIGKILLed process needs to be scheduled once."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_started_process_leads_its_own_group_and_appends_to_its_log(tmp_path):
    log = tmp_path / "out.log"
    log.write_text("earlier\n")
    process = start_in_group(_python("import os; print(os.getpgid(0), os.getsid(0))"), log)
    assert process.wait(timeout=60) == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier" and lines[1] == f"{process.pid} {process.pid}"


def test_stopping_a_group_kills_a_stubborn_leader_and_the_workers_it_spawned(tmp_path):
    port, log = free_port(), tmp_path / "stubborn.log"
    process = start_in_group([*_python(STUBBORN), str(port)], log)
    wait_for_port(process, "127.0.0.1", port, 60, log)
    worker = int(log.read_text().split()[0])
    assert pid_alive(worker)
    stop_group(process, timeout=0.5)
    assert process.returncode == -signal.SIGKILL, "the leader ignored SIGTERM, so SIGKILL ended it"
    assert _ends(worker), "the worker in the leader's group was stopped with it"


def test_a_well_behaved_process_ends_on_sigterm_and_keeps_its_exit_code(tmp_path):
    process = start_in_group(_python("import time; time.sleep(600)"), tmp_path / "sleep.log")
    stop_group(process, timeout=60)
    assert process.returncode == -signal.SIGTERM


def test_stopping_by_pid_reaps_a_child_of_ours(tmp_path):
    """The centre's shutdown knows the SuperLink only by the pid in its state file."""
    process = start_in_group(_python("import time; time.sleep(600)"), tmp_path / "sleep.log")
    stop_group(process.pid, timeout=60)
    assert not pid_alive(process.pid)
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left behind
        os.waitpid(process.pid, os.WNOHANG)


def test_wait_for_port_reports_an_early_exit_with_its_code_and_log(tmp_path):
    log = tmp_path / "fails.log"
    process = start_in_group(_python("import sys; print('bad flag', flush=True); sys.exit(3)"), log)
    with pytest.raises(ProcessStartError, match=rf"exited with code 3; see {log}"):
        wait_for_port(process, "127.0.0.1", free_port(), 60, log)
    assert "bad flag" in log.read_text()


def test_wait_for_port_gives_up_with_the_callers_error_and_leaves_the_process_to_it(tmp_path):
    class StartError(RuntimeError):
        pass

    log, port = tmp_path / "silent.log", free_port()
    process = start_in_group(_python("import time; time.sleep(600)"), log)
    try:
        with pytest.raises(StartError, match=rf"did not open port {port} within 0s; see {log}"):
            wait_for_port(process, "127.0.0.1", port, 0.2, log, error=StartError)
        assert process.poll() is None
    finally:
        stop_group(process, timeout=60)


def test_a_zombie_is_not_alive():
    process = subprocess.Popen(["true"])
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # ended, its status not yet collected
    os.kill(process.pid, 0)  # the kernel still lists it...
    assert not pid_alive(process.pid)  # ...but it runs no more
    process.wait()


def test_pid_file(tmp_path):
    write_pid_file(tmp_path / "a.pid")
    write_pid_file(tmp_path / "b.pid", 1234)
    assert (tmp_path / "a.pid").read_text() == f"{os.getpid()}\n" and (tmp_path / "b.pid").read_text() == "1234\n"


ODD = 'St Mary\'s "main" site\\x'  # an apostrophe, quotes, spaces and a backslash


def test_the_centres_connection_survives_quotes_spaces_and_backslashes_in_its_path(tmp_path, monkeypatch):
    """The flwr CLI reads back exactly the CA path the centre wrote (f-string TOML broke on a quote)."""
    centre = Centre(tmp_path / ODD)
    write_connection(centre, "127.0.0.1:9092", insecure=False)
    monkeypatch.setenv("FLWR_HOME", str(centre.flwr_home))
    connection = read_superlink_connection()  # Flower's own reader, default connection
    assert connection.name == CONNECTION and connection.address == "127.0.0.1:9092"
    assert connection.root_certificates == str(centre.certs / "ca.crt") and not connection.insecure


def test_an_insecure_connection_in_an_odd_flwr_home(tmp_path, monkeypatch):
    flwr_home = tmp_path / ODD / "flwr"
    write_flwr_connection(flwr_home, "clinicfl-sim", "127.0.0.1:9093")
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    connection = read_superlink_connection("clinicfl-sim")
    assert connection.insecure and connection.root_certificates is None and connection.address == "127.0.0.1:9093"


def test_set_reads_values_as_flwr_run_run_config_does():
    items = ["num-rounds=3", "lr=0.001", "dp-target-epsilon=8.0", "dp-enabled=true", "secure-aggregation=false",
             'aggregation="fedmedian"', "run-name='St Mary s'", 'drill-sites="01"', "max-update-norm=1e3"]
    values = parse_assignments(items)
    assert values == {"num-rounds": 3, "lr": 0.001, "dp-target-epsilon": 8.0, "dp-enabled": True,
                      "secure-aggregation": False, "aggregation": "fedmedian", "run-name": "St Mary s",
                      "drill-sites": "01", "max-update-norm": 1000.0}
    assert values == parse_config_args([" ".join(items)])  # flwr run --run-config "k=v k=v ..."
    assert parse_assignments(["a=1 b=\"two\""]) == {"a": 1, "b": "two"}, "one item may hold several pairs"


@pytest.mark.parametrize("item, hint", [
    ("drill-sites=01", "--set 'drill-sites=\"01\"'"),  # a leading zero is not a TOML number: not silently 1
    ("aggregation=fedavg", "--set 'aggregation=\"fedavg\"'"),
    ("dp-enabled=True", "--set 'dp-enabled=\"True\"'"),  # TOML's booleans are lower case
    ("resume-from=best.toml", "--set 'resume-from=\"best.toml\"'"),  # not opened as a config file
    ("run-name=", "--set 'run-name=\"\"'"),  # Flower would skip it without a word
    ("lr = 0.1", "--set 'lr=\"0.1\"'"),
])
def test_a_value_that_is_not_toml_is_refused_with_how_to_quote_it(item, hint):
    with pytest.raises(ValueError) as info:  # not click's exception: the CLIs catch ValueError
        parse_assignments([item])
    assert hint in str(info.value) and "flwr run --run-config" in str(info.value)


def test_items_without_a_key_or_a_toml_type_flower_keeps():
    with pytest.raises(ValueError, match="--node-config expects KEY=VALUE, got 'drill'"):
        parse_assignments(["drill"], "--node-config")
    with pytest.raises(ValueError, match=r"--set sites=\[1,2\]: The value for key sites needs to be of type"):
        parse_assignments(["sites=[1,2]"])
