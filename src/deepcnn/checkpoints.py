"""Reading checkpoint files as data: tensors and plain values, never code.

A checkpoint is a pickle, and an unrestricted pickle can call any function while it loads. torch's
weights-only unpickler builds only tensors, plain containers and numbers, and refuses everything
else. That is all a deepcnn checkpoint holds, for every preset and precision (Lightning's loop,
callback, optimizer and scheduler states, the lookahead average and the hyperparameters are plain
dicts, lists, strings and numbers), so nothing needs allow-listing beyond torch's own defaults.
"""
from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from deepcnn.errors import CheckpointError

# How torch's weights-only unpickler names what it refused, e.g. "GLOBAL io.open".
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def read_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The contents of a checkpoint file, or a CheckpointError that names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        with warnings.catch_warnings():
            # A plain pickle (not written by torch.save) warns about its protocol before it is refused.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = REFUSED_GLOBAL.search(str(err))
        if refused:
            raise CheckpointError(f"{path}: refused: loading it would call {refused.group(1)}, and a checkpoint holds "
                                  "only tensors and plain values (this file could run code)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(err)})") from None
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, damaged or cut short "
                              f"({_reason(err) or 'the file ends early'})") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _reason(err: Exception) -> str:
    """torch's own explanation, without its advice: the unpickler's message after 'WeightsUnpickler error:'
    (it is preceded by paragraphs about weights_only), else the first sentence."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split()).split(". ", 1)[0].rstrip(".")
