"""Shared pytest setup: make the repository root importable and keep CPU work small and repeatable."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tests use tiny tensors: one thread is as fast and never oversubscribes a shared CPU
