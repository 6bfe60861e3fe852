"""TEMPORARY stand-in until the precision branch is merged."""
import torch


def choose_precision(requested, accelerator):
    if str(requested) != "auto":
        return str(requested), "as requested"
    return "bf16-mixed", "stub"
