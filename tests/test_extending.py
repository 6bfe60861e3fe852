"""docs/extending.md's worked example: a model class, an optimizer and a dataset added from outside the
package (a module on PYTHONPATH, YAML files on hydra.searchpath), trained through src/train.py."""
import json
import os
import re

from conftest import ROOT, run_cli, write_dataset

DOC = (ROOT / "docs" / "extending.md").read_text()


def block(path: str) -> str:
    """The code block of the doc that starts with a comment naming `path`."""
    match = re.search(rf"```\w+\n# {re.escape(path)}\n(.*?)```", DOC, re.S)
    assert match, f"docs/extending.md has no block for {path}"
    return match.group(1)


def test_the_documented_model_optimizer_and_dataset_train(tmp_path):
    project = tmp_path / "my_project"
    data = write_dataset(tmp_path / "data").parent
    for path in ("my_models.py", "conf/model/tiny.yaml", "conf/optimizer/rmsprop.yaml", "conf/data/my_cifar.yaml"):
        target = project / path
        target.parent.mkdir(parents=True, exist_ok=True)
        text = block(f"my_project/{path}")
        target.write_text(text.replace("/data/my_cifar", str(data)).replace("val_size: 1000", "val_size: 32"))
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "model=tiny", "optimizer=rmsprop", "data=my_cifar", f"hydra.searchpath=[file://{project / 'conf'}]",
                     "data.batch_size=16", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.precision=32",
                     f"hydra.run.dir={run_dir}", env={"PYTHONPATH": f"{project}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 6 and results["status"] == "done" and results["val_accuracy"] is not None
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "my_models.TinyNet" in config and "torch.optim.RMSprop" in config and str(data) in config
