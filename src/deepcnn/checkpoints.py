"""Checkpoints: what one holds, writing it whole, reading it as data, and the settings a resume must keep.

A deepcnn checkpoint is a Lightning checkpoint whose hyperparameters are the configs the run was built
from (model, optimizer, scheduler, loss, classes, input size), so it rebuilds its own network; the data
module's state adds the settings that decide the data order.

A checkpoint is a pickle, and an unrestricted pickle can call any function while it loads. torch's
weights-only unpickler builds only tensors, plain containers and numbers, and refuses everything
else. That is all a deepcnn checkpoint holds, for every preset and precision (Lightning's loop,
callback, optimizer and scheduler states, the lookahead average and the hyperparameters are plain
dicts, lists, strings and numbers), so nothing needs allow-listing beyond torch's own defaults.
"""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import zipfile
import warnings
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from deepcnn.errors import CheckpointError
from deepcnn.files import OutputError, replaced_on_success
from deepcnn.module import Classifier

class CheckpointWriteError(OutputError):
    """A checkpoint could not be written (the disk is full): the run stops, and the previous one is kept whole."""


# The hyperparameters that rebuild a Classifier; a run resumed with any of them changed is another run.
BUILD_KEYS = ("model", "optimizer", "scheduler", "loss", "classes", "input_size")


# How torch's weights-only unpickler names what it refused: "Unsupported global: GLOBAL io.open", or for a
# blocked module "unsupported GLOBAL posix.system whose module posix is blocked".
REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")
# Pickle opcodes that name a function or class: GLOBAL with its argument, STACK_GLOBAL with the two
# strings pushed before it.
GLOBAL_OPS = {"GLOBAL", "INST"}


def pickled_globals(path: Path) -> list[str]:
    """The functions and classes a pickle names ("posix.system"), read without unpickling it: from the file,
    or from the data.pkl inside a torch.save archive."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in GLOBAL_OPS:
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        return names
    except Exception:  # noqa: BLE001 - a damaged pickle names nothing; the caller reports torch's own reason
        return []


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
        # torch names only what it refused; when it stops earlier (an opcode it does not read), the pickle's own.
        called = refused.group(1) if refused else next(iter(pickled_globals(path)), None)
        if called:
            raise CheckpointError(f"{path}: refused: loading it would call {called}, and a "
                                  "checkpoint holds only tensors and plain values (this file could run code)") from None
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


def deepcnn_checkpoint(path: str | Path) -> dict:
    """A checkpoint that deepcnn wrote: read as data, with the settings that rebuild its network."""
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not set(BUILD_KEYS) <= set(hparams):
        raise CheckpointError(f"{path}: not a deepcnn checkpoint (no deepcnn model settings in it)")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, syncs it, then renames it over the old one, so a write
    cut off midway leaves the previous checkpoint whole; reads one as data (see read_checkpoint)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        try:
            with replaced_on_success(path) as partial, open(partial, "wb") as out:
                torch.save(checkpoint, out)
                out.flush()
                os.fsync(out.fileno())
        except OutputError as err:
            raise CheckpointWriteError(str(err)) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_checkpoint(path)


def flatten(settings: dict, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}: settings named as on the command line."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_changed_settings(path, saved: dict, current: dict) -> None:
    """A resumed run keeps the settings its checkpoint was trained with: name the first one that differs.
    Keys the checkpoint does not hold (written by an older version) are not compared."""
    saved, current = flatten(saved), flatten(current)
    for key in sorted(set(saved) | set(current)):
        if key in saved and saved.get(key) != current.get(key):
            now = current.get(key, "no such setting")
            raise CheckpointError(f"{path}: was trained with {key}={saved[key]}, but this run has {key}={now}; "
                                  "resume with the settings it was trained with, or start a new run from its "
                                  f"weights with init_from={path}")


def refuse_other_length(path: str | Path, checkpoint: dict, scheduler: dict, max_steps: int) -> None:
    """trainer.max_steps may change on a resume only where the schedule does not span the run: a schedule
    whose settings hold total_steps (triangle, linear, cosine: ${trainer.max_steps}) would change its shape
    mid-run; a step-based one (exponential's staircase, constant) is extended as it stands."""
    saved = checkpoint["hyper_parameters"]["scheduler"]
    if "total_steps" in saved and saved["total_steps"] != scheduler.get("total_steps"):
        raise CheckpointError(f"{path}: was trained with trainer.max_steps={saved['total_steps']}, which its schedule "
                              f"({saved['_target_']}) spans, but this run has trainer.max_steps={max_steps}; resume "
                              f"with trainer.max_steps={saved['total_steps']} (only a step-based schedule, "
                              "scheduler=exponential or constant, may be extended), or start a new run from its "
                              f"weights with init_from={path}")
    step = checkpoint.get("global_step", 0)
    if step > max_steps:
        raise CheckpointError(f"{path}: is at step {step}, past trainer.max_steps={max_steps}; resume with "
                              f"trainer.max_steps={step} or more, or start a new run from its weights with "
                              f"init_from={path}")


def check_resumable(path: str | Path, hparams: dict, datamodule=None, max_steps: int | None = None) -> None:
    """Resuming continues the checkpoint's run: the network, classes, optimizer, schedule and loss must be its own,
    and so must the settings that order its data (checked here, before the run starts; the number of processes,
    which only the Trainer knows, the data module checks as the checkpoint is loaded). Its length may grow only
    under a step-based schedule (refuse_other_length)."""
    checkpoint = deepcnn_checkpoint(path)
    if max_steps is not None:
        refuse_other_length(path, checkpoint, hparams["scheduler"], max_steps)
    saved = checkpoint["hyper_parameters"]
    refuse_changed_settings(path, {k: saved[k] for k in BUILD_KEYS}, {k: hparams[k] for k in BUILD_KEYS})
    if datamodule is not None:
        order = {k: v for k, v in checkpoint.get(type(datamodule).__qualname__, {}).items() if k != "world_size"}
        refuse_changed_settings(path, order, {k: v for k, v in datamodule.state_dict().items() if k != "world_size"})


def load_classifier(path: str | Path) -> Classifier:
    """A Classifier from a deepcnn checkpoint, in evaluation mode, or a CheckpointError saying what is wrong."""
    checkpoint = deepcnn_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    try:
        classifier = Classifier(**{k: hparams[k] for k in BUILD_KEYS}, tta=hparams.get("tta", 0))
    except Exception as err:
        raise CheckpointError(f"{path}: the model it names cannot be built ({type(err).__name__}: {err})") from None
    load_weights(classifier, checkpoint, path, "the model it names")
    classifier.on_load_checkpoint(checkpoint)
    return classifier.eval()


def load_weights(classifier: Classifier, checkpoint: dict, path: str | Path, network: str = "the network of this run"
                 ) -> None:
    try:
        classifier.load_state_dict(checkpoint["state_dict"])
    except Exception as err:
        details = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise CheckpointError(f"{path}: its weights do not fit {network} ({details})") from None


def network_name(hparams: dict) -> str:
    """A network as its settings name it: "RecipeCNN(channels=64, hidden=[384, 192]) for 10 classes"."""
    model = hparams["model"]
    settings = ", ".join(f"{key}={value}" for key, value in model.items() if not key.startswith("_"))
    return f"{model['_target_'].rsplit('.', 1)[-1]}({settings}) for {len(hparams['classes'])} classes"


def init_weights(classifier: Classifier, path: str | Path) -> None:
    """init_from: a new run starts from a checkpoint's weights, which must fit its network."""
    checkpoint = deepcnn_checkpoint(path)
    try:
        classifier.load_state_dict(checkpoint["state_dict"])
    except Exception:
        raise CheckpointError(f"init_from={path}: holds the weights of {network_name(checkpoint['hyper_parameters'])}, "
                              f"which do not fit this run's {network_name(classifier.hparams)}") from None


def resolve_resume(ckpt_path: str | None, run_dir: Path) -> str | None:
    """ckpt_path=auto: the run directory's last checkpoint when it has one, else a fresh start."""
    if ckpt_path != "auto":
        return ckpt_path
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def checkpoint_run_dir(ckpt_path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (the folder above its checkpoints/ folder); None for a file kept
    elsewhere, which belongs to no run."""
    ckpt = Path(ckpt_path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def run_directory(ckpt_path: str | None, default: Path) -> Path:
    """A resumed run carries on in the run directory its checkpoint belongs to."""
    return (checkpoint_run_dir(ckpt_path) if ckpt_path else None) or default


def step_of(path: str | Path) -> int:
    return int(read_checkpoint(path).get("global_step", 0))


def refuse_rewind(ckpt_path: str | Path) -> None:
    """A checkpoint of a run that went on past it would rewind the run: its last.ckpt and results would be
    rewritten from the earlier step."""
    last = Path(ckpt_path).parent / "last.ckpt"
    if not last.is_file() or last.resolve() == Path(ckpt_path).resolve():
        return
    step, newest = step_of(ckpt_path), step_of(last)
    if step < newest:
        raise CheckpointError(f"{ckpt_path}: is at step {step}, but its run went on to step {newest} ({last}); "
                              f"resuming it would rewind the run: resume from {last}, or start a new run from its "
                              f"weights with init_from={ckpt_path}")


def refuse_final(run_dir: Path, ckpt_path: str | Path, max_steps: int) -> None:
    """A finished run is final: resuming it at its last step would only measure it again, and rewrite what its
    results say it measured (its training time among them). A larger trainer.max_steps extends it."""
    results = run_dir / "results.json"
    if not results.is_file() or json.loads(results.read_text()).get("status") != "done":
        return
    step = step_of(ckpt_path)
    if step >= max_steps:
        raise CheckpointError(f"{run_dir}: finished at step {step} ({results}); a finished run is final: evaluate it "
                              f"with python src/eval.py ckpt_path={ckpt_path}, extend it with a larger "
                              "trainer.max_steps (a step-based schedule), or start a new run from its weights with "
                              f"init_from={ckpt_path}")


def command_line_value(argv: list[str], key: str) -> str | None:
    """The value an override on the command line gives `key` (the last one wins, as in Hydra), as Hydra reads it
    (Lightning's launcher quotes the run folder it gives its other processes); None if none."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in argv if "=" in a])
    except HydraException:
        return None  # Hydra reports the malformed override in its own words, once it starts
    values = [o.value() for o in overrides if o.key_or_group == key]
    return None if not values or values[-1] is None else str(values[-1])


def resume_arguments(argv: list[str]) -> list[str]:
    """train.py's command line, with the run folder a resume implies: a run resumed from a checkpoint carries on
    in the checkpoint's own run folder (every file of the run in one place; Hydra would make a new folder for the
    command). Refused here, before Hydra creates anything: a checkpoint that does not exist, a run folder that
    is not the checkpoint's, and a checkpoint that is not its run's newest. A multirun's runs are left to it."""
    if {"-m", "--multirun"} & set(argv):
        return argv
    ckpt = command_line_value(argv, "ckpt_path")
    if ckpt in (None, "null", "auto"):
        return argv
    if not Path(ckpt).is_file():
        raise CheckpointError(f"{ckpt}: checkpoint file does not exist")
    home = checkpoint_run_dir(ckpt)
    if home is None:
        return argv
    given = command_line_value(argv, "hydra.run.dir")
    if given is not None and Path(given).resolve() != home.resolve():
        raise CheckpointError(f"hydra.run.dir={given}: is not the run folder of {ckpt} ({home}); a resumed run carries "
                              f"on in its own folder: leave hydra.run.dir out, or start a new run in {given} from its "
                              f"weights with init_from={ckpt}")
    refuse_rewind(ckpt)
    return argv if given is not None else [*argv, f"hydra.run.dir={home}"]
