"""Fault injection: bad input, numerical faults and impossible configs each give a clear error, and never
leave a half-written cache behind."""

import functools
import os
import subprocess
import sys
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from data.base import LRADataModule
from data.cache import atomic_directory, atomic_write, cached_arrays
from data.listops import ListOpsDataModule, generate_listops, write_listops_tsv
from lra.module import LRAClassifier, NonFiniteLossError
from lra.validate import ConfigError, validate_config
from models.attention.linformer import LinformerAttention
from models.attention.softmax import SoftmaxAttention
from models.heads import LRAModel
from tests.helpers import ROOT, compose_config, run_train


def _listops_folder(tmp_path, rows=None):
    folder = tmp_path / "listops"
    folder.mkdir(parents=True, exist_ok=True)
    examples = generate_listops(24, seed=1, min_length=10, max_length=40)
    parts = rows or {"train": examples[:16], "val": examples[16:20], "test": examples[20:]}
    for split, split_rows in parts.items():
        write_listops_tsv(folder / f"basic_{split}.tsv", split_rows)
    return folder


def _listops(tmp_path, folder):
    return ListOpsDataModule(
        data_dir=str(folder), data_root=str(tmp_path / "lra-data"), seq_len=48, batch_size=4
    )


def _assert_cache_clean(tmp_path):
    """No temporary build folder and no cache without its COMPLETE marker."""
    cache = tmp_path / "lra-data"
    assert not list(cache.rglob(".tmp-*")), list(cache.rglob(".tmp-*"))
    for marker_dir in cache.glob("cache/*/*"):
        if marker_dir.is_dir():
            assert (marker_dir / "COMPLETE").is_file(), f"half-written cache {marker_dir}"


def _full_message(error):
    return str(error) + "".join(getattr(error, "__notes__", []))


# -- bad input -----------------------------------------------------------------------------------------


def test_truncated_cache_file_names_it_and_says_delete_and_rerun(tmp_path):
    module = _listops(tmp_path, _listops_folder(tmp_path))
    module.prepare_data()
    damaged = module.cache_dir / "train.input_ids.npy"
    os.truncate(damaged, damaged.stat().st_size // 2)
    with pytest.raises(RuntimeError) as error:
        _listops(tmp_path, tmp_path / "listops").setup("fit")
    assert str(damaged) in str(error.value)
    assert f"delete {module.cache_dir} and rerun" in str(error.value)

    (module.cache_dir / "train.input_ids.npy").unlink()
    with pytest.raises(RuntimeError, match="missing cache file .*train.input_ids.npy"):
        _listops(tmp_path, tmp_path / "listops").setup("fit")


def test_truncated_tsv_names_file_and_line_and_caches_nothing(tmp_path):
    folder = _listops_folder(tmp_path)
    train = folder / "basic_train.tsv"
    text = train.read_bytes()
    # Cut the file in the middle of its last row, before the tab that separates the target.
    train.write_bytes(text[: text.rstrip(b"\r\n").rfind(b"\t") - 5])
    lines = train.read_bytes().count(b"\n") + 1
    with pytest.raises(ValueError) as error:
        _listops(tmp_path, folder).prepare_data()
    assert f"{train}:{lines}: expected 2 tab-separated fields" in str(error.value)
    assert "nothing was cached" in _full_message(error.value)
    _assert_cache_clean(tmp_path)


def test_wrong_label_values_are_rejected(tmp_path):
    examples = generate_listops(24, seed=1, min_length=10, max_length=40)
    bad = [*examples[:5], (examples[5][0], 12), *examples[6:16]]
    folder = _listops_folder(tmp_path, {"train": bad, "val": examples[16:20], "test": examples[20:]})
    with pytest.raises(ValueError, match=r"basic_train.tsv:7: target 12 is outside 0\.\.9"):
        _listops(tmp_path, folder).prepare_data()
    _assert_cache_clean(tmp_path)

    # Any task: labels outside 0..num_classes-1 from a reader are caught before they are cached.
    class BadLabels(LRADataModule):
        task_name, num_classes, source = "demo", 2, "release"

        def cache_params(self):
            return {}

        def build_arrays(self):
            arrays = {
                "input_ids": np.ones((3, 4), np.uint8),
                "lengths": np.full(3, 4),
                "labels": np.array([0, 1, 5]),
            }
            return {split: arrays for split in ("train", "val", "test")}

    with pytest.raises(ValueError, match=r"demo: the train split has label 5 at example 2 .* outside 0\.\.1"):
        BadLabels(seq_len=4, batch_size=2, data_root=str(tmp_path / "lra-data")).prepare_data()
    _assert_cache_clean(tmp_path)


def test_empty_split_names_the_data_and_what_to_do(tmp_path):
    examples = generate_listops(20, seed=1, min_length=10, max_length=40)
    folder = _listops_folder(tmp_path, {"train": examples[:16], "val": [], "test": examples[16:]})
    with pytest.raises(ValueError) as error:
        _listops(tmp_path, folder).prepare_data()
    message = str(error.value)
    assert "the val split is empty" in message and str(folder) in message and "re-download" in message
    _assert_cache_clean(tmp_path)


def test_unwritable_data_dir_says_how_to_choose_another(tmp_path):
    # A path under a regular file cannot be created even by root (chmod does not stop root).
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    module = ListOpsDataModule(
        data_dir=str(_listops_folder(tmp_path)), data_root=str(blocker / "lra"), seq_len=48, batch_size=4
    )
    with pytest.raises(PermissionError) as error:
        module.prepare_data()
    assert str(blocker / "lra") in str(error.value) and "LRA_DATA_DIR" in str(error.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_data_dir_says_how_to_choose_another(tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o500)
    module = ListOpsDataModule(
        data_dir=str(_listops_folder(tmp_path)), data_root=str(read_only), seq_len=48, batch_size=4
    )
    with pytest.raises(PermissionError, match="LRA_DATA_DIR"):
        module.prepare_data()


def test_failed_build_leaves_no_temporary_folder_and_no_cache(tmp_path):
    target = tmp_path / "lra-data" / "cache" / "demo" / "abc"

    def fails_half_way():
        raise OSError("disk full while generating")

    with pytest.raises(OSError, match="disk full"):
        cached_arrays(target, fails_half_way)
    assert not target.exists()
    _assert_cache_clean(tmp_path)


KILLED_BUILD = """
import sys, time
from pathlib import Path
from data.cache import atomic_directory

def build(tmp):
    (tmp / "part").write_text("half")
    print("building", flush=True)
    time.sleep(60)

atomic_directory(Path(sys.argv[1]), build)
"""


def test_sigkilled_build_is_cleaned_up_by_the_next_one(tmp_path):
    target = tmp_path / "lra-data" / "generated"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "building"
    process.kill()
    process.wait(timeout=30)
    assert not target.exists() and list(target.parent.glob(".tmp-generated-*"))
    # The lock died with its holder: the next build runs at once, replaces the leftovers, completes.
    atomic_directory(target, lambda tmp: (tmp / "done").write_text("ok"))
    assert (target / "done").read_text() == "ok"
    assert not list(target.parent.glob(".tmp-*"))


def test_a_failed_report_or_figure_write_keeps_the_previous_file(tmp_path):
    """Reports, tables and figures go through atomic_write: a writer that dies half way leaves the old file
    and no temporary sibling."""
    from matplotlib.figure import Figure  # no pyplot, no backend: as the reports draw

    path = tmp_path / "report" / "figure.png"
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    atomic_write(path, functools.partial(figure.savefig, format="png"), binary=True)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def dies_half_way(handle):
        handle.write(b"\x89PNG half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, dies_half_way, binary=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]


CONCURRENT_BUILD = """
import sys, time, hashlib, os
from pathlib import Path
import numpy as np
from data.cache import cached_arrays

def build():
    with open(sys.argv[2], "a") as log:
        log.write(f"{os.getpid()}\\n")
    time.sleep(3.0)  # long enough for the other process to start and find the lock, even on a busy machine
    rng = np.random.default_rng(os.getpid())
    return {"train": {"labels": rng.integers(0, 2, 1000), "input_ids": rng.integers(0, 9, (1000, 8))}}

arrays = cached_arrays(Path(sys.argv[1]), build)
print(hashlib.sha256(np.asarray(arrays["train"]["input_ids"]).tobytes()).hexdigest(), flush=True)
"""


def test_two_processes_building_the_same_cache_build_it_once(tmp_path):
    target, log = tmp_path / "lra-data" / "cache" / "demo" / "key", tmp_path / "builds.log"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_BUILD, str(target), str(log)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert len(log.read_text().split()) == 1, "the cache was built twice"
    digests = [output.strip().splitlines()[-1] for output in outputs]
    assert digests[0] == digests[1]
    assert any("waiting for another process" in output for output in outputs)
    _assert_cache_clean(tmp_path)


def tiny_model(attention, **options) -> LRAModel:
    """One layer, 16 wide, for 16 tokens of a 17-token vocabulary and 10 classes."""
    sizes = dict(vocab_size=17, seq_len=16, num_classes=10, d_model=16, mlp_dim=32, n_layers=1, num_heads=2)
    return LRAModel(attention, **sizes, qkv_dim=16, **options)


def test_sequence_longer_than_the_model_is_a_clear_error():
    module = LRAClassifier(
        tiny_model(functools.partial(LinformerAttention, proj_len=8)),
        optimizer=torch.optim.AdamW,
        scheduler=_CONSTANT,
        num_classes=10,
    )
    batch = {"input_ids": torch.ones(2, 20, dtype=torch.long), "mask": torch.ones(2, 20, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"input of 20 tokens, but the model was built for data.seq_len=16"):
        module(batch)


def test_truncated_parquet_names_the_file(tmp_path):
    from data.text import TextDataModule
    from tests.tiny.text import tiny_reviews, write_imdb_parquet

    folder = write_imdb_parquet(tmp_path / "imdb", {"train": tiny_reviews(32), "test": tiny_reviews(16, 100)})
    damaged = folder / "train.parquet"
    os.truncate(damaged, damaged.stat().st_size // 2)
    module = TextDataModule(
        data_dir=str(folder), data_root=str(tmp_path / "lra-data"), seq_len=64, batch_size=4
    )
    with pytest.raises(Exception) as error:  # noqa: B017 - the type is the reader's; the message is the point
        module.prepare_data()
    assert str(folder) in _full_message(error.value)
    _assert_cache_clean(tmp_path)
    assert str(damaged) in str(error.value)


def test_truncated_png_in_image_parquet_names_the_row(tmp_path):
    from datasets import Dataset

    from data.image import ImageDataModule
    from tests.tiny.image import CIFAR_FEATURES, png_bytes, random_images, write_cifar_parquet

    rgb, labels = random_images(40, 0)
    images = [{"bytes": png_bytes(image), "path": f"train/{row:04d}.png"} for row, image in enumerate(rgb)]
    images[5]["bytes"] = images[5]["bytes"][:60]
    folder = tmp_path / "cifar10"
    folder.mkdir()
    columns = {"img": images, "label": [int(label) for label in labels]}
    Dataset.from_dict(columns, features=CIFAR_FEATURES).to_parquet(str(folder / "train.parquet"))
    write_cifar_parquet(folder, {"test": random_images(8, 1)})
    module = ImageDataModule(data_dir=str(folder), data_root=str(tmp_path / "lra-data"), batch_size=4)
    with pytest.raises(Exception) as error:  # noqa: B017 - the type is the decoder's; the message is the point
        module.prepare_data()
    assert str(folder) in _full_message(error.value)
    _assert_cache_clean(tmp_path)
    assert "train/0005.png" in str(error.value) or "row 5" in str(error.value)


def test_truncated_png_in_pathfinder_names_the_file(tmp_path):
    from data.pathfinder import PathfinderDataModule
    from data.pathfinder_generator import pathfinder_params, write_pathfinder

    folder = tmp_path / "pathfinder32" / "curv_contour_length_14"
    write_pathfinder(
        folder, pathfinder_params(32, "hard"), num_images=4, images_per_batch=4, seed=0, workers=1
    )
    damaged = sorted(folder.rglob("*.png"))[1]
    os.truncate(damaged, damaged.stat().st_size // 2)
    module = PathfinderDataModule(
        data_dir=str(folder),
        data_root=str(tmp_path / "lra-data"),
        batch_size=2,
        workers=1,
        split="contiguous",
    )
    with pytest.raises(ValueError, match="unreadable or truncated PNG") as error:
        module.prepare_data()
    assert str(folder) in _full_message(error.value)
    _assert_cache_clean(tmp_path)
    assert str(damaged) in str(error.value)


# -- numerical faults ----------------------------------------------------------------------------------

_CONSTANT = {"name": "constant", "warmup_steps": 0, "total_steps": 100}


class RandomTokens(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {
            "input_ids": torch.randint(1, 17, (16,), generator=generator),
            "mask": torch.ones(16, dtype=torch.bool),
            "label": torch.tensor(index % 10),
        }


class Inject(L.Callback):
    """Makes the loss (``what="loss"``) or one parameter's gradient (``what="grad"``) NaN at given batches."""

    def __init__(self, what, batches):
        self.what, self.batches, self.active = what, set(batches), False

    def setup(self, trainer, pl_module, stage):
        model = pl_module.model
        if self.what == "loss":
            model.register_forward_hook(lambda m, i, out: out * float("nan") if self.active else out)
        else:
            target = model.encoder.blocks[0].qkv.weight
            target.register_hook(lambda grad: grad * float("nan") if self.active else grad)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.active = batch_idx in self.batches


def _fit(inject, max_nonfinite_steps=0, max_steps=6, precision="32-true", accelerator="cpu"):
    torch.manual_seed(0)
    module = LRAClassifier(
        tiny_model(SoftmaxAttention, dropout=0.0),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=_CONSTANT,
        num_classes=10,
        max_nonfinite_steps=max_nonfinite_steps,
        reproduce="python train.py task=listops seed=0",
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        max_steps=max_steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[inject],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(RandomTokens(), batch_size=4))
    return trainer, module


def test_nonfinite_loss_stops_with_step_and_reproduce_command():
    with pytest.raises(NonFiniteLossError) as error:
        _fit(Inject("loss", {2}))
    message = str(error.value)
    assert "non-finite training loss (nan) at batch 2" in message and "at step 2" in message
    assert "all parameters finite" in message
    assert "reproduce: python train.py task=listops seed=0" in message
    assert "trainer.max_nonfinite_steps" in message


def test_nonfinite_gradient_names_the_parameter_and_param_group():
    with pytest.raises(NonFiniteLossError) as error:
        _fit(Inject("grad", {3}))
    message = str(error.value)
    assert "non-finite gradient in parameter 'model.encoder.blocks.0.qkv.weight'" in message
    assert "optimizer param group 0" in message and "at step 3" in message


def test_a_bounded_number_of_bad_steps_is_skipped():
    trainer, module = _fit(Inject("loss", {1, 3}), max_nonfinite_steps=2)
    assert module.nonfinite_steps == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    trainer, module = _fit(Inject("grad", {2}), max_nonfinite_steps=1)
    assert module.nonfinite_steps == 1 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())
    with pytest.raises(NonFiniteLossError, match="2 non-finite step"):
        _fit(Inject("loss", {1, 3}), max_nonfinite_steps=1)


def test_bf16_mixed_precision_trains():
    trainer, module = _fit(Inject("loss", set()), max_steps=3, precision="bf16-mixed")
    assert trainer.global_step == 3 and module.nonfinite_steps == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA (CPU runs bf16)")
def test_fp16_overflowing_gradients_are_left_to_the_grad_scaler():
    trainer, module = _fit(Inject("grad", {2}), max_steps=4, precision="16-mixed", accelerator="gpu")
    assert module.nonfinite_steps == 0 and trainer.global_step == 4
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -- config validation ---------------------------------------------------------------------------------


def _validate(*overrides):
    return validate_config(compose_config(["profile=cpu", *overrides]))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.num_heads=3"], r"model.qkv_dim=64 is not divisible by model.num_heads=3"),
        (["attention=linformer", "attention.proj_len=600"], r"proj_len must lie in \[1, max_len=513\]"),
        (
            ["attention=softmax", "attention.backend=efficient", "trainer.accelerator=cpu"],
            r"cannot run on cpu",
        ),
        (["attention=softmax", "attention.backend=cudnn", "trainer.accelerator=cpu"], r"cannot run on cpu"),
        (["attention=softmax", "attention.backend=fast"], r"unknown SDPA backend 'fast'"),
        (["attention=taylorshift", "attention.mode=sideways"], r"mode"),
        (["attention=fastmax", "attention.order=1", "attention.lim=2.0"], r"order 1 requires lim <= 1"),
        (["eval.checkpoint=best"], r"eval.checkpoint='best' is not one of"),
        (["scheduler.name=step"], r"scheduler.name='step'"),
        (["trainer.max_nonfinite_steps=-1"], r"trainer.max_nonfinite_steps=-1 must be an integer >= 0"),
        (["attention=softmax", "attn_dropout=1.5"], r"softmax: dropout \(the task's attn_dropout.*got 1\.5"),
        (["attention=linformer", "attn_dropout=abc"], r"linformer: dropout .*must lie in .*got 'abc'"),
        (["attention=taylorshift", "attention.dropout=-0.1"], r"taylorshift: dropout must lie in \[0, 1\)"),
    ],
)
def test_impossible_configs_fail_with_the_keys_to_fix(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        _validate("task=listops", *overrides)


def test_flash_backend_runs_on_cpu_and_valid_configs_pass():
    assert (
        _validate("task=listops", "attention=softmax", "attention.backend=flash", "trainer.accelerator=cpu")
        == []
    )
    assert _validate("task=listops", "attention=linformer", "attention.proj_len=256") == []


def test_best_val_on_the_text_test_split_warns():
    warnings_found = _validate("task=text", "eval.checkpoint=best_val")
    assert any("selects the checkpoint on the test set" in w for w in warnings_found)
    assert _validate("task=text", "eval.checkpoint=best_val", "data.val_split=train_holdout") == []


def test_train_py_rejects_an_impossible_config_before_loading_data(tmp_path):
    result = run_train(
        [
            "task=listops",
            "profile=cpu",
            "logger=none",
            "attention=linformer",
            "attention.proj_len=9999",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "invalid configuration" in message and "proj_len" in message and "data.seq_len=512" in message
    assert not (tmp_path / "lra-data").exists(), "data was touched before the config was checked"
    assert not (tmp_path / "run" / "summary.json").exists()
