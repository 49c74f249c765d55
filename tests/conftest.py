"""Shared pytest setup: make the repository root importable and keep CPU work small and repeatable."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tests use tiny tensors: one thread is as fast and never oversubscribes a shared CPU

# Parity tests compare minildm with reference libraries (diffusers, transformers, peft, safetensors,
# open_clip) that are test-only: without them the tests skip with a reason naming the library or the
# `parity` extra. CI installs them and sets MINILDM_REQUIRE_PARITY=1, which turns any such skip into a failure.
_parity_skips: list = []
_REFERENCE_WORDS = ("parity", "reference", "diffusers", "transformers", "peft", "safetensors", "open_clip",
                    "ftfy", "regex", "scipy")


def pytest_runtest_logreport(report):
    if report.skipped and any(word in str(report.longrepr) for word in _REFERENCE_WORDS):
        _parity_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if _parity_skips and os.environ.get("MINILDM_REQUIRE_PARITY") == "1":
        print(f"\nMINILDM_REQUIRE_PARITY=1 but {len(_parity_skips)} parity test(s) skipped: "
              + ", ".join(_parity_skips[:5]) + ". Install the reference libraries (see .ci/run).")
        session.exitstatus = 1
