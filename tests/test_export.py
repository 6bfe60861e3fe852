"""ONNX export: raw pixels in, logits out, the same answers as PyTorch's evaluation pipeline."""
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from conftest import run_cli
from deepcnn import augment
from deepcnn.errors import CheckpointError
from deepcnn.export import export_onnx
from deepcnn.files import OutputError
from deepcnn.checkpoints import load_classifier
from deepcnn.records import open_dataset


# Two threads fighting over this machine's two shared cores run far slower than one.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_onnx_model_gives_pytorch_top1_on_the_whole_test_set(shared_data, tmp_path):
    # No validation pass during training: the test set is read once, at the end.
    trained = run_cli("train.py", f"data.data_dir={shared_data}", "data.download=false", "data.batch_size=64",
                      "trainer.max_steps=40", "trainer.val_check_interval=40", "data.eval_batch_size=2000",
                      f"hydra.run.dir={tmp_path / 'run'}", env=ONE_THREAD)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    exported = run_cli("export.py", f"ckpt_path={checkpoint}", f"output={tmp_path / 'model.onnx'}",
                       f"hydra.run.dir={tmp_path / 'h'}")
    assert exported.returncode == 0, exported.stderr

    module = load_classifier(checkpoint)
    metadata = {p.key: p.value for p in onnx.load(tmp_path / "model.onnx").metadata_props}
    assert json.loads(metadata["classes"]) == module.hparams.classes
    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    [model_input] = session.get_inputs()
    assert model_input.shape[1:] == [3, 32, 32] and model_input.type == "tensor(float)"

    test = open_dataset(shared_data).test
    agree, largest_gap = 0, 0.0
    for start in range(0, len(test), 1000):
        images, _ = test.batch(np.arange(start, min(start + 1000, len(test))))
        [onnx_logits] = session.run(None, {model_input.name: images.astype(np.float32)})
        with torch.no_grad():
            torch_logits = module(augment.preprocess(torch.from_numpy(images), module.hparams.input_size)).numpy()
        agree += int((onnx_logits.argmax(1) == torch_logits.argmax(1)).sum())
        largest_gap = max(largest_gap, float(np.abs(onnx_logits - torch_logits).max()))
    print(f"ONNX and PyTorch agree on {agree} of {len(test)} test images; largest logit difference {largest_gap:.2e}")
    assert agree == len(test) == 10_000
    assert largest_gap < 1e-3
    # any batch size, one image included
    [single] = session.run(None, {model_input.name: images[:1].astype(np.float32)})
    np.testing.assert_allclose(single, onnx_logits[:1], rtol=1e-4, atol=1e-4)


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        export_onnx(bogus, tmp_path / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("spelling", ["the same path", "another spelling of it"])
def test_export_never_writes_over_its_checkpoint(spelling, small_checkpoint, tmp_path):
    before = small_checkpoint.read_bytes()
    output = small_checkpoint if spelling == "the same path" else tmp_path / "runs" / ".." / "model.ckpt"
    result = run_cli("export.py", f"ckpt_path={small_checkpoint}", f"output={output}",
                     f"hydra.run.dir={tmp_path / 'h'}")
    assert result.returncode == 2
    assert (f"deepcnn: error: {output}: is the input {small_checkpoint}; writing it would change the input, "
            "choose another output") in result.stderr
    assert "Traceback" not in result.stderr
    assert small_checkpoint.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "model.ckpt"]


def test_export_names_an_output_folder_it_cannot_create(small_checkpoint, tmp_path):
    (tmp_path / "file").write_text("in the way")
    output = tmp_path / "file" / "model.onnx"
    with pytest.raises(OutputError) as err:
        export_onnx(small_checkpoint, output)
    assert str(err.value) == f"{output}: {tmp_path / 'file'} is a file, not a folder"
