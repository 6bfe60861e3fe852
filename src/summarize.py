"""One table for a sweep, written into it: python src/summarize.py dir=outputs/multiruns/DATE_TIME"""
import hydra
from omegaconf import DictConfig, OmegaConf

from deepcnn import cli
from deepcnn.errors import reported_errors
from deepcnn.summary import SweepError, markdown, read_sweep, write_summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="summarize")
def main(cfg: DictConfig) -> None:
    with reported_errors():
        if OmegaConf.is_missing(cfg, "dir"):
            raise SweepError("no sweep directory given: add dir=outputs/multiruns/DATE_TIME")
        sweep = read_sweep(cfg.dir)
        written = write_summary(sweep)
        print(markdown(sweep))
        for path in written:
            print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
