"""tinystories.devices: the one device parser every command uses."""

import pytest
import torch

from tinystories.devices import _cpu_key, cached_cpu_peak_flops, parse_device
from tinystories.errors import UserError


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: False)
    assert parse_device("auto") == torch.device("cpu")
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: True)
    assert parse_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_device("auto") == torch.device("cuda")


def test_explicit_devices_and_their_errors(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"--device cuda:1: CUDA is not available"):
        parse_device("cuda:1")
    monkeypatch.setattr("tinystories.devices.mps_available", lambda: False)
    with pytest.raises(UserError, match="--device mps: MPS is not available"):
        parse_device("mps")
    for bad in ("gpu", "cuda:x", "xla"):
        with pytest.raises(UserError, match="expected auto, cpu, cuda, cuda:N or mps"):
            parse_device(bad)


def _environment_after_import(**variables: str) -> dict:
    """os.environ's OpenMP wait variables as a fresh `import tinystories` leaves them."""
    import json
    import os
    import subprocess
    import sys

    from tinystories import OPENMP_WAIT_VARIABLES

    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES}
    env.update(variables)
    code = ("import json, os, tinystories, torch; "
            f"print(json.dumps({{k: os.environ.get(k) for k in {OPENMP_WAIT_VARIABLES!r}}}))")
    output = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(output.stdout)


def test_importing_the_package_shortens_openmp_spinning_unless_the_user_chose():
    assert _environment_after_import() == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": None}
    # Any wait variable of the user's wins, and nothing is added beside it.
    assert _environment_after_import(OMP_WAIT_POLICY="ACTIVE") == {
        "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None}
    assert _environment_after_import(GOMP_SPINCOUNT="300000")["GOMP_SPINCOUNT"] == "300000"


def test_training_threads_are_the_cores_nobody_else_is_using(monkeypatch):
    from tinystories import devices

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "usable_cores", lambda: 4)
    try:
        for busy, expected in ((0.0, 4), (0.3, 4), (0.9, 3), (1.2, 3), (2.0, 2), (9.0, 1)):
            monkeypatch.setattr(devices, "cores_busy_elsewhere", lambda busy=busy: busy)
            assert devices.use_free_cores(torch.device("cpu")) == expected == torch.get_num_threads(), busy
        assert devices.use_free_cores(torch.device("cpu"), saved_threads=2) == 2  # a resumed run's own count
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert devices.use_free_cores(torch.device("cpu"), saved_threads=2) == 3  # the user's choice wins
        assert devices.use_free_cores(torch.device("meta")) is None
    finally:
        torch.set_num_threads(before)


def test_a_busy_program_is_seen_on_the_cores():
    import subprocess
    import sys

    from tinystories.devices import cores_busy_elsewhere

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start
        assert cores_busy_elsewhere(0.5) >= 0.6  # one busy loop: about one core
    finally:
        spinner.kill()
        spinner.wait()


def test_a_cached_peak_below_the_peak_at_fewer_threads_is_raised_to_it(tmp_path, monkeypatch):
    """A 2-thread peak measured on a busy moment (below the 1-thread one) must not give MFU > 100%."""
    monkeypatch.setenv("TINYSTORIES_CACHE", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr("tinystories.devices.measure_cpu_matmul_flops", lambda: 40e9)
    assert cached_cpu_peak_flops() == 40e9  # measured once and cached
    (tmp_path / "cpu_peak_flops.json").write_text(
        '{"%s": 70e9, "%s": 40e9}' % (_cpu_key(1), _cpu_key(2)))
    assert cached_cpu_peak_flops() == 70e9
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cached_cpu_peak_flops() == 70e9
