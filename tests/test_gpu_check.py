"""scripts/gpu_check.py stays runnable without a GPU: its argument handling and a section on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_asking_for_cuda_without_it_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "CUDA is not available" in out.stderr


def test_the_mining_section_compares_devices():
    mod = _load()
    rep = mod.Report()
    mod.check_mining(rep, torch.device("cpu"), quick=True)
    assert rep.failed == 0 and len(rep.rows) == 4
    assert rep.rows[0]["value"] == "80/80"  # blocks.3 has 80 units, all with the same top-9 on the same device
    assert mod.rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.2])) == pytest.approx(0.1)
