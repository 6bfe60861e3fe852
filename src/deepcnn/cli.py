"""What every entry script shares: the config resolvers it needs, and errors reported as one line.

Entry scripts call `run(main)` on their Hydra main function, whose task runs inside
`errors.reported_errors()`. Mistakes that Hydra itself finds (an unknown key or option, a malformed
override) end as deepcnn's own UserErrors do: one line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deepcnn.download import DEFAULT_CACHE
from deepcnn.errors import UserError


# Hydra plugins that are optional extras of pyproject.toml, by the config option that names them.
PLUGIN_EXTRAS = {"hydra/launcher/joblib": "cluster", "hydra/launcher/submitit_local": "cluster",
                 "hydra/launcher/submitit_slurm": "cluster"}
_claimed: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """`path`, created now, or `path_1`, `path_2`, ... when it is taken: two runs started in the same second
    never share a folder. The same answer for the same `path` within a process, however often it is resolved.
    Hydra also evaluates the setting while composing, before it is known to be the one used: only once the
    job's config is set (the moment Hydra picks the run's folder) is a folder claimed."""
    if not HydraConfig.initialized():
        return path
    if path not in _claimed:
        _claimed[path] = claim_dir(path)
    return _claimed[path]


def claim_dir(path: str, setting: str = "hydra.run.dir") -> str:
    """`path`, or `path_1`, `path_2`, ... when it is taken, created now: made in one step, so that of two processes
    asking at once each gets its own. `setting` names the folder's setting, for a folder that cannot be made."""
    base, suffix = Path(path), 0
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        while True:
            candidate = base if suffix == 0 else base.with_name(f"{base.name}_{suffix}")
            try:
                candidate.mkdir()
                return str(candidate)
            except FileExistsError:
                suffix += 1
    except OSError as err:
        raise UserError(f"{base.parent.absolute()}: the run's folder cannot be created there ({err.strerror}); run "
                        f"from a folder you can write to, or name one with {setting}=FOLDER") from None


def remove_if_unused(folder: str | Path) -> bool:
    """Remove a run's folder that holds nothing but the config Hydra wrote in it: a run that did not start
    leaves nothing behind. Whether it was removed."""
    folder = Path(folder)
    if folder.is_dir() and {path.name for path in folder.iterdir()} <= {".hydra"}:
        shutil.rmtree(folder)
        return True
    return False


def forget_claimed(folder: str | Path) -> None:
    """A folder this process claimed for a run (unique_dir), removed if the run did not start."""
    if Path(folder).resolve() in {Path(claimed).resolve() for claimed in _claimed.values()}:
        remove_if_unused(folder)


def holds_run(folder: str | Path) -> bool:
    """Whether a folder already holds a run: its results or its checkpoints."""
    return (Path(folder) / "results.json").exists() or (Path(folder) / "checkpoints").exists()


def config_subdir(subdir: str, _root_) -> str | None:
    """hydra.output_subdir: where Hydra saves a run's config, or None (not saved) when the run's folder already
    holds a run. That run's config is the record of how it was made, and stays: a resume carries it on, a
    sweep run again finishes it, a command refused for reusing it changes nothing."""
    output_dir = OmegaConf.select(_root_, "hydra.runtime.output_dir", default=None)
    return None if output_dir and holds_run(output_dir) else subdir


def override_key(override: str) -> str:
    """The key an override sets: "optimizer.lr" of "optimizer.lr=0.05", "+extra=1" and "~key"."""
    return override.split("=", 1)[0].lstrip("+~")


def run_overrides(hydra_cfg) -> list[str]:
    """The overrides that made this run: a run carried on in its folder (a resume, extended or not) keeps the
    name it was given when it started, from the config it keeps there (see config_subdir)."""
    # A config composed outside a run (tests, benchmarks) has no folder yet.
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None)
    if hydra_cfg.mode == RunMode.RUN and output_dir and holds_run(output_dir):
        saved = Path(output_dir) / ".hydra" / "overrides.yaml"
        if saved.is_file():
            return list(OmegaConf.load(saved))
    return list(hydra_cfg.overrides.task)


def run_name(limit: int = 200) -> str:
    """A run's name, from the overrides that set it apart: all of a single run's, and in a sweep those the
    sweep varies ("optimizer.lr=0.05,seed=1"; the values common to all its runs say nothing). One folder
    name: no "/", and a long one cut short with a digest of the whole, since a name holds at most 255 bytes."""
    hydra_cfg = HydraConfig.get()
    left_out = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        given = OverridesParser.create().parse_overrides([a for a in sys.argv[1:] if "=" in a])
        left_out |= {override_key(o.input_line) for o in given if not o.is_sweep_override()}
    overrides = [o for o in run_overrides(hydra_cfg) if override_key(o) not in left_out]
    name = ",".join(sorted(overrides)).replace("/", "_") or "run"
    if len(name.encode()) > limit:
        name = f"{name.encode()[:limit - 9].decode(errors='ignore')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


OmegaConf.register_new_resolver("unique_dir", unique_dir, replace=True)
OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("config_subdir", config_subdir, replace=True)
OmegaConf.register_new_resolver("min", min, replace=True)
OmegaConf.register_new_resolver("data_cache", lambda: str(DEFAULT_CACHE), replace=True)
# ${fraction:${trainer.max_steps},0.5}: a share of a count, as a whole number.
OmegaConf.register_new_resolver("fraction", lambda count, share: round(count * share), replace=True)


def one_line(err: Exception) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    for option, extra in PLUGIN_EXTRAS.items():
        # Hydra cannot "find" an option named on the command line, or "load" one a config's defaults name.
        if f"Could not find '{option}'" in text or f"Could not load '{option}'" in text:
            text += f" ({option} is a Hydra plugin that comes with an extra: pip install -e '.[{extra}]')"
    return text


def run(main: Callable[[], object]) -> None:
    # Hydra would print its own report and exit 1; deepcnn reports instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        # deepcnn's own error in a resolver (unique_dir), which OmegaConf wraps in its own.
        cause = next((e for e in chain(err) if isinstance(e, UserError)), None)
        print(f"deepcnn: error: {cause if cause else one_line(err)}", file=sys.stderr)
        sys.exit(2)


def chain(err: BaseException | None):
    """An exception and those it was raised from or during."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__
