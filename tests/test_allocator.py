import os
import subprocess
import sys
import textwrap

import pytest

# Page faults over ten training steps of the recipe network, after ten steps of warm-up.
PROBE = textwrap.dedent("""
    import resource, sys, torch
    import torch.nn.functional as F
    from deepcnn.allocator import keep_freed_memory
    from deepcnn.models import RecipeCNN

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    torch.set_num_threads(1)
    model = RecipeCNN().to(memory_format=torch.channels_last)
    images = torch.randn(64, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (64,))
    for _ in range(10):
        F.cross_entropy(model(images), labels).backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        F.cross_entropy(model(images), labels).backward()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def step_faults(mode: str) -> tuple[str, int]:
    # glibc raises its mmap threshold as large blocks are freed, at moments that vary from run to run (some
    # runs fault 40,000 times in these ten steps, others not at all); fixed at its initial 128 KiB, it maps
    # and unmaps every large block every step, as the recipe's runs measured (5,200 faults a step).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)} if mode == "default" else None
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    kept, faults = out.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.slow
def test_training_steps_reuse_freed_memory():
    _, default = step_faults("default")
    kept, faults = step_faults("keep")
    assert kept == "True"
    assert default > 5_000  # glibc maps and unmaps the large activations and gradients every step
    assert faults < default / 10
