"""Pathfinder / Path-X: labels checked on the render by an independent flood fill, determinism, the release
layout (text and binary metadata, empty images), reader errors, and the DataModules."""

import logging

import numpy as np
import pytest
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

import data.pathfinder
import data.pathfinder_generator
from data.pathfinder import (
    DIFFICULTY_DIRS,
    PathfinderDataModule,
    PathXDataModule,
    decode_png,
    list_examples,
    read_metadata,
    write_metadata,
)
from data.pathfinder_generator import (
    generate_sample,
    metadata_row,
    pathfinder_params,
    sample_seed,
    write_pathfinder,
)

INK = 0.3  # canvas intensity counted as ink: markers are painted at 1.0, paddles at 0.75-1.5


def markers_linked(canvas: np.ndarray, markers, scale: int, link: float) -> bool:
    """Flood fill over the ink pixels of the canvas, where two ink pixels whose centres are at most
    ``link`` output pixels apart are neighbours; True when it reaches the second marker from the first."""
    ink = np.argwhere(canvas >= INK)
    rows = {tuple(pixel): row for row, pixel in enumerate(ink.tolist())}
    (ax, ay), (bx, by) = markers
    start, goal = rows[(int(ay * scale), int(ax * scale))], rows[(int(by * scale), int(bx * scale))]
    pairs = cKDTree(ink).query_pairs(link * scale, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(ink), len(ink)))
    _, component = connected_components(graph, directed=False)
    return component[start] == component[goal]


def lanczos_bytes(canvas: np.ndarray, resolution: int) -> np.ndarray:
    small = np.asarray(
        Image.fromarray(canvas.astype(np.float32)).resize((resolution, resolution), Image.Resampling.LANCZOS)
    )
    small = np.clip(small.astype(np.float64), 0, None)
    return np.round(255 * (small - small.min()) / (small.max() - small.min()))


@pytest.mark.parametrize(("resolution", "count"), [(32, 20), (128, 3)])
def test_labels_agree_with_an_independent_flood_fill(resolution, count):
    """Consecutive paddles are 2*margin apart; other paths keep 2*margin + 1 (label-0 markers must not be
    reachable). Linking ink up to 2*margin + 0.75 apart joins label-1 markers and never label-0 ones, and
    1 pixel is too short to cross a dash gap, so the paths really are dashed."""
    params = pathfinder_params(resolution, "hard")
    scale = params.antialias_scale
    labels = []
    for index in range(count):
        sample = generate_sample(params, np.random.default_rng(sample_seed(3, params, 0, index)))
        link = 2 * sample.margin + 0.75
        assert markers_linked(sample.canvas, sample.markers, scale, link) == bool(sample.label), index
        if sample.label:
            assert not markers_linked(sample.canvas, sample.markers, scale, 1.0), index
        # The PNG is the Lanczos downsample of that canvas, and both markers are bright in it.
        assert sample.image.shape == (resolution, resolution) and sample.image.dtype == np.uint8
        assert np.abs(sample.image - lanczos_bytes(sample.canvas, resolution)).max() <= 1
        for x, y in sample.markers:
            assert sample.image[int(y), int(x)] >= 128
        labels.append(sample.label)
    if count >= 10:
        assert 0 < sum(labels) < count


def test_same_seed_gives_identical_files_for_any_worker_count(tmp_path):
    params = pathfinder_params(32, "hard")
    folders = {workers: tmp_path / f"workers{workers}" for workers in (1, 2)}
    for workers, folder in folders.items():
        write_pathfinder(folder, params, num_images=5, images_per_batch=4, seed=5, workers=workers, chunk=2)
    files = sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*") if p.is_file())
    assert [str(p) for p in files] == [
        "imgs/0/sample_0.png",
        "imgs/0/sample_1.png",
        "imgs/0/sample_2.png",
        "imgs/0/sample_3.png",
        "imgs/1/sample_0.png",
        "metadata/0.npy",
        "metadata/1.npy",
    ]
    for name in files:
        assert (folders[1] / name).read_bytes() == (folders[2] / name).read_bytes(), name
    write_pathfinder(tmp_path / "other", params, num_images=2, images_per_batch=4, seed=6, workers=1)
    assert (tmp_path / "other/imgs/0/sample_0.png").read_bytes() != (folders[1] / files[0]).read_bytes()


def test_generated_metadata_is_the_release_text_format(tmp_path):
    folder = tmp_path / "curv_contour_length_14"
    write_pathfinder(
        folder, pathfinder_params(32, "hard"), num_images=3, images_per_batch=10, seed=0, workers=1
    )
    text = (folder / "metadata/0.npy").read_text()
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 3
    for index, line in enumerate(lines):
        fields = line.split(" ")
        assert fields[:3] == ["imgs/0", f"sample_{index}.png", str(index)] and fields[3] in ("0", "1")
        # continuity, contour length, distractor length, paddle length/thickness/margin, paddle contrasts
        assert fields[4:] == ["1", "14", "4", "2", "0.5", "1", "1"]
        with Image.open(folder / fields[0] / fields[1]) as image:
            assert image.mode == "L" and image.size == (32, 32)


def test_metadata_round_trip(tmp_path):
    params = pathfinder_params(128, "hard")
    rows = [metadata_row(params, 7, index, index % 2, margin) for index, margin in enumerate((2, 3, 2))]
    write_metadata(tmp_path / "7.npy", rows)
    assert read_metadata(tmp_path / "7.npy") == rows
    assert rows[1] == ["imgs/7", "sample_1.png", "1", "1", "1.8", "14", "4", "5", "1.5", "3", "1"]


def write_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)


def row(batch: str, index: int, label: int) -> list[str]:
    return [
        f"imgs/{batch}",
        f"sample_{index}.png",
        str(index),
        str(label),
        "1.0",
        "14",
        "4",
        "2",
        "0.5",
        "1",
        "1",
    ]


@pytest.fixture
def release(tmp_path):
    """A hand-written difficulty folder: batch 0 as text, batch 10 as a binary .npy (the upstream
    generator's format), batch 2 as text with an empty PNG. Image k has every pixel = k, except
    pixel (0, 1) = 255 - k, so each decoded row identifies its file."""
    folder = tmp_path / "lra_release" / "pathfinder32" / "curv_contour_length_14"
    images = {}
    batches = {"0": 4, "2": 4, "10": 4}
    value = 1
    for batch, size in batches.items():
        rows = []
        for index in range(size):
            label = (value + index) % 2
            rows.append(row(batch, index, label))
            pixels = np.full((32, 32), value)
            pixels[0, 1] = 255 - value
            write_png(folder / f"imgs/{batch}/sample_{index}.png", pixels)
            images[(batch, index)] = (value, label)
            value += 1
        if batch == "10":
            (folder / "metadata").mkdir(parents=True, exist_ok=True)
            np.save(folder / "metadata/10.npy", np.array(rows))
        else:
            write_metadata(folder / f"metadata/{batch}.npy", rows)
    (folder / "imgs/2/sample_3.png").write_bytes(b"")
    del images[("2", 3)]
    return folder, images


def test_reader_on_the_release_layout(release, tmp_path, caplog):
    folder, images = release
    with caplog.at_level(logging.WARNING):
        paths, labels = list_examples(folder)
    assert "skipped 1 empty image" in caplog.text
    # Batches in numeric order (0, 2, 10), lines in file order.
    assert [(p.parent.name, p.name) for p in paths][:5] == [("0", f"sample_{i}.png") for i in range(4)] + [
        ("2", "sample_0.png")
    ]
    assert [p.parent.name for p in paths][-4:] == ["10"] * 4
    assert labels == [images[(p.parent.name, int(p.stem.split("_")[1]))][1] for p in paths]
    module = PathfinderDataModule(
        data_dir=str(folder), batch_size=2, data_root=str(tmp_path / "cache"), workers=1, split="contiguous"
    )
    arrays = module.build_arrays()
    assert {split: len(a["labels"]) for split, a in arrays.items()} == {"train": 8, "val": 1, "test": 2}
    order = [images[(p.parent.name, int(p.stem.split("_")[1]))] for p in paths]
    train = arrays["train"]
    assert train["input_ids"].dtype == np.uint8 and train["input_ids"].shape == (8, 1024)
    assert (train["lengths"] == 1024).all() and train["labels"].dtype == np.int64
    for position, (value, label) in enumerate(order[:8]):
        expected = np.full(1024, value, dtype=np.uint8)
        expected[1] = 255 - value  # row-major: pixel (row 0, column 1) is token 1
        assert (train["input_ids"][position] == expected).all()
        assert train["labels"][position] == label


def test_seeded_split_is_a_reproducible_partition(release, tmp_path):
    folder, images = release
    splits = []
    for _ in range(2):
        module = PathfinderDataModule(
            data_dir=str(folder), batch_size=2, data_root=str(tmp_path / "c"), workers=2
        )
        splits.append(module.build_arrays())
    first = {split: arrays["input_ids"][:, 0].tolist() for split, arrays in splits[0].items()}
    assert first == {split: arrays["input_ids"][:, 0].tolist() for split, arrays in splits[1].items()}
    assert sorted(sum(first.values(), [])) == sorted(value for value, _ in images.values())
    assert first["train"] != sorted(first["train"])


def test_malformed_metadata_names_file_and_line(release):
    folder, _ = release
    lines = (folder / "metadata/0.npy").read_text().splitlines()
    lines[2] = "imgs/0 sample_2.png 2"
    (folder / "metadata/0.npy").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata/0\.npy:3: expected 11 space-separated fields"):
        list_examples(folder)
    lines[2] = " ".join(row("0", 2, 1)).replace(" 1 1.0 ", " yes 1.0 ")
    (folder / "metadata/0.npy").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata/0\.npy:3: label .* 'yes'"):
        list_examples(folder)


def test_missing_data_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere"
    module = PathfinderDataModule(data_dir=str(missing), batch_size=2, data_root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="task.data_dir") as error:
        module.build_arrays()
    assert str(missing) in str(error.value) and "curv_contour_length_14" in str(error.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"metadata/<batch>\.npy") as error:
        list_examples(tmp_path / "empty")
    assert "task.data_dir=null" in str(error.value)
    (tmp_path / "broken/metadata").mkdir(parents=True)
    write_metadata(tmp_path / "broken/metadata/0.npy", [row("0", 0, 1)])
    with pytest.raises(FileNotFoundError, match=r"0\.npy: lists imgs/0/sample_0\.png"):
        list_examples(tmp_path / "broken")


def test_decode_rejects_other_formats(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8), mode="RGB").save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="8-bit grayscale"):
        decode_png(tmp_path / "rgb.png", 32)
    write_png(tmp_path / "small.png", np.zeros((16, 16)))
    with pytest.raises(ValueError, match="expected 32x32 pixels, got 16x16"):
        decode_png(tmp_path / "small.png", 32)


def test_generated_data_module_caches_and_reuses(tmp_path, monkeypatch):
    kwargs = dict(num_images=20, images_per_batch=10, batch_size=4, data_root=str(tmp_path), workers=1)
    module = PathfinderDataModule(**kwargs)
    module.prepare_data()
    module.setup()
    assert module.source == "generated" and module.seq_len == 1024
    assert {split: len(ds) for split, ds in module.datasets.items()} == {"train": 16, "val": 2, "test": 2}
    generated = list((tmp_path / "pathfinder").glob("generated-*/pathfinder32/curv_contour_length_14"))
    assert len(generated) == 1 and len(list(generated[0].glob("imgs/*/*.png"))) == 20
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (4, 1024) and batch["mask"].all()

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated instead of reusing the cache")

    monkeypatch.setattr(data.pathfinder_generator, "write_pathfinder", refuse)
    again = PathfinderDataModule(**kwargs)
    again.setup()
    assert again.describe()["sizes"] == module.describe()["sizes"]
    monkeypatch.setattr(data.pathfinder, "decode_pngs", refuse)
    other_split = PathfinderDataModule(**kwargs, split="contiguous")
    with pytest.raises(AssertionError, match="regenerated"):
        other_split.setup()  # a new split re-reads the PNGs, but the images themselves are reused


def test_module_settings_and_errors():
    pathx = PathXDataModule(batch_size=2)
    assert (pathx.task_name, pathx.resolution, pathx.seq_len, pathx.vocab_size) == ("pathx", 128, 16384, 256)
    with pytest.raises(ValueError, match="does not match data.resolution=32"):
        PathfinderDataModule(batch_size=2, seq_len=1000)
    with pytest.raises(ValueError, match="data.difficulty='medium'"):
        PathfinderDataModule(batch_size=2, difficulty="medium")
    with pytest.raises(ValueError, match="data.split='random'"):
        PathfinderDataModule(batch_size=2, split="random")
    easy = pathfinder_params(32, "easy")
    assert (easy.contour_length, easy.distractor_length, easy.num_distractor_snakes) == (6, 2, 10)
    hard = pathfinder_params(128, "hard")
    assert (hard.num_distractor_snakes, DIFFICULTY_DIRS["easy"]) == (8, "curv_baseline")


def test_all_difficulties_together(tmp_path):
    module = PathfinderDataModule(
        difficulty="all", num_images=5, images_per_batch=10, batch_size=2, data_root=str(tmp_path), workers=1
    )
    arrays = module.build_arrays()
    assert {split: len(a["labels"]) for split, a in arrays.items()} == {"train": 12, "val": 1, "test": 2}
    folders = sorted(p.name for p in (tmp_path / "pathfinder").glob("generated-*/pathfinder32/*"))
    assert folders == sorted(DIFFICULTY_DIRS.values())
