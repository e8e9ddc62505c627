"""The TF-free input pipeline: order, resumption, host slicing, eval coverage, augmentation."""

import os

import numpy as np
import pytest

from jaxmerge.datasets import wflw
from jaxmerge.datasets.prepare import prepare
from jaxmerge.input_pipeline import loader, ops, sources


def make_source(n, size=8, channels=1):
    """Examples whose image, label and value all encode their index."""
    return [
        {
            "image": np.full((size, size, channels), i, np.uint8),
            "label": i,
            "value": np.float32(i),
        }
        for i in range(n)
    ]


AUGMENT = ops.compose(ops.random_crop(2), ops.random_flip())


def take(iterator, count):
    out = [next(iterator) for _ in range(count)]
    if hasattr(iterator, "close"):
        iterator.close()
    return out


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_other_seed_other_order():
    source = make_source(10)
    first = take(loader.train_batches(source, AUGMENT, 4, seed=3), 6)
    again = take(loader.train_batches(source, AUGMENT, 4, seed=3, prefetch=0), 6)
    assert_batches_equal(first, again)
    other = take(loader.train_batches(source, AUGMENT, 4, seed=4), 6)
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(first, other))


def test_each_epoch_visits_every_example_once_in_a_new_order():
    source = make_source(12)
    batches = take(loader.train_batches(source, ops.compose(), 4, seed=0), 6)
    epoch0 = np.concatenate([b["label"] for b in batches[:3]])
    epoch1 = np.concatenate([b["label"] for b in batches[3:]])
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12))
    assert not np.array_equal(epoch0, epoch1)


def test_resuming_at_step_s_equals_continuing():
    source = make_source(10)  # batches of 4 straddle epoch boundaries
    continuous = take(loader.train_batches(source, AUGMENT, 4, seed=1), 9)
    resumed = take(loader.train_batches(source, AUGMENT, 4, seed=1, start_step=5), 4)
    assert_batches_equal(continuous[5:], resumed)


def test_host_slices_partition_the_global_batch():
    source = make_source(10)
    single = take(loader.train_batches(source, AUGMENT, 6, seed=2), 4)
    hosts = [
        take(loader.train_batches(source, AUGMENT, 6, seed=2, process_index=h, process_count=3), 4)
        for h in range(3)
    ]
    for step in range(4):
        for key in single[step]:
            joined = np.concatenate([hosts[h][step][key] for h in range(3)])
            np.testing.assert_array_equal(joined, single[step][key])
        assert hosts[0][step]["image"].shape == (2, 8, 8, 1)


def test_threads_and_prefetch_do_not_change_the_batches():
    source = make_source(9)
    plain = take(loader.train_batches(source, AUGMENT, 3, seed=5, prefetch=0), 5)
    threaded = take(loader.train_batches(source, AUGMENT, 3, seed=5, prefetch=3, num_threads=2), 5)
    assert_batches_equal(plain, threaded)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_a_padding_mask(process_count):
    source = make_source(10)
    seen = []
    for h in range(process_count):
        batches = list(
            loader.eval_batches(
                source, ops.compose(), 4, process_index=h, process_count=process_count
            )
        )
        assert len(batches) == loader.num_eval_steps(10, 4) == 3
        for batch in batches:
            assert batch["mask"].dtype == bool and len(batch["mask"]) == 4 // process_count
            seen.extend(batch["label"][batch["mask"]].tolist())
    assert sorted(seen) == list(range(10))
    last = list(loader.eval_batches(source, ops.compose(), 4))[-1]
    np.testing.assert_array_equal(last["mask"], [True, True, False, False])


def test_source_errors_reach_the_consumer():
    class Broken:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        next(loader.train_batches(Broken(), ops.compose(), 2, seed=0, prefetch=2))


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        loader.train_batches(make_source(4), ops.compose(), 4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        loader.eval_batches(make_source(4), ops.compose(), 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="std must be > 0"):
        ops.normalize((0.5,), (0.0,))


def test_normalisation_and_channel_conversions():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    ex = {"image": image}
    scaled = ops.normalize_to_minus_one_one()(ex, rng)["image"]
    assert scaled.dtype == np.float32 and scaled.min() >= -1 and scaled.max() <= 1
    np.testing.assert_allclose(scaled, image / 127.5 - 1, atol=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = ops.normalize(mean, std)(ex, rng)["image"]
    np.testing.assert_allclose(out[1, 2], (image[1, 2] / 255 - mean) / std, rtol=1e-5)
    grey = {"image": image[..., :1]}
    rgb = ops.to_rgb()(grey, rng)["image"]
    assert rgb.shape == (6, 6, 3) and (rgb == image[..., :1]).all()
    np.testing.assert_array_equal(ops.to_grayscale()({"image": rgb}, rng)["image"], image[..., :1])
    luma = ops.to_grayscale()(ex, rng)["image"]
    expected = np.round(image[0, 0] @ np.array([0.299, 0.587, 0.114]))
    assert luma.shape == (6, 6, 1) and abs(int(luma[0, 0, 0]) - expected) <= 1


def test_resize_and_random_crop_shapes_and_content():
    rng = np.random.default_rng(0)
    ex = {"image": np.full((10, 14, 1), 200, np.uint8), "label": 1}
    assert ops.resize(16)(ex, rng)["image"].shape == (16, 16, 1)
    assert ops.resize(5, 7)(ex, rng)["image"].shape == (5, 7, 1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # RGB path == channel by channel
    per_channel = [ops.resize(7, 9)({"image": rgb[..., c : c + 1]}, rng)["image"] for c in range(3)]
    np.testing.assert_array_equal(
        ops.resize(7, 9)({"image": rgb}, rng)["image"], np.concatenate(per_channel, axis=-1)
    )
    np.testing.assert_array_equal(ops.random_crop(0)(ex, rng)["image"], ex["image"])
    crops = [ops.random_crop(3)(ex, np.random.default_rng(s))["image"] for s in range(20)]
    assert all(c.shape == (10, 14, 1) for c in crops)
    assert all(set(np.unique(c)) <= {0, 200} for c in crops)  # zero padding shifted in
    assert any((c == 0).any() for c in crops)
    with pytest.raises(ValueError, match="uint8"):
        ops.resize(4)({"image": np.zeros((8, 8, 1), np.float32)}, rng)


@pytest.mark.parametrize("padding", [1, 3, 9])  # 9 > the image's height: some crops are all zero
def test_random_crop_is_the_crop_of_the_zero_padded_image_at_every_offset(padding):
    image = np.random.default_rng(1).integers(1, 256, (7, 11, 3), dtype=np.uint8)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    seen = set()
    for seed in range(20 * (2 * padding + 1) ** 2):
        dy, dx = np.random.default_rng(seed).integers(0, 2 * padding + 1, size=2)
        got = ops.random_crop(padding)({"image": image}, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(got, padded[dy : dy + 7, dx : dx + 11])
        seen.add((int(dy), int(dx)))
    assert len(seen) == (2 * padding + 1) ** 2  # every offset was checked


def landmark_example(points_px, height=12, width=16):
    """An image with one pixel of intensity 10 * (i + 1) at each landmark i (pixel centres)."""
    image = np.zeros((height, width, 1), np.uint8)
    for i, (col, row) in enumerate(points_px):
        image[row, col] = 10 * (i + 1)
    landmarks = (np.asarray(points_px, np.float32) + 0.5) / np.array([width, height])
    return {"image": image, "landmarks": landmarks.astype(np.float32)}


def pixel_under(example, i):
    height, width = example["image"].shape[:2]
    x, y = example["landmarks"][i]
    return example["image"][int(np.floor(y * height)), int(np.floor(x * width)), 0]


def test_random_crop_moves_landmarks_with_the_pixels():
    ex = landmark_example([(5, 4), (9, 7), (12, 6)])
    for seed in range(10):
        out = ops.random_crop(2)(ex, np.random.default_rng(seed))
        for i in range(3):
            x, y = out["landmarks"][i]
            if 0 <= x < 1 and 0 <= y < 1:
                assert pixel_under(out, i) == 10 * (i + 1)


def test_flip_mirrors_x_and_swaps_left_right_landmarks():
    # points 0 and 1 are a left/right pair, point 2 lies on the midline
    ex = landmark_example([(3, 5), (12, 5), (8, 2)])
    perm = np.array([1, 0, 2])
    flipped = ops.flip_horizontally(ex, perm)
    np.testing.assert_array_equal(flipped["image"], ex["image"][:, ::-1])
    for i in range(3):  # point i now sits on the mirrored pixel of point perm[i]
        assert pixel_under(flipped, i) == 10 * (perm[i] + 1)
    np.testing.assert_allclose(flipped["landmarks"][0, 0], 1 - ex["landmarks"][1, 0])
    twice = ops.flip_horizontally(flipped, perm)
    np.testing.assert_allclose(twice["landmarks"], ex["landmarks"], atol=1e-6)
    with pytest.raises(ValueError, match="landmark_permutation"):
        ops.flip_horizontally(ex, None)
    with pytest.raises(ValueError, match="permutation of 0..K-1"):
        ops.random_flip([0, 0, 1])


def test_wflw_flip_keeps_a_symmetric_face_symmetric():
    # a face symmetric about x = 0.5 whose pairs follow FLIP_PERMUTATION: flipping is a no-op
    rng = np.random.default_rng(0)
    points = rng.uniform(0.1, 0.9, (98, 2)).astype(np.float32)
    perm = wflw.FLIP_PERMUTATION
    for i in range(98):
        if perm[i] > i:
            points[perm[i]] = (1 - points[i, 0], points[i, 1])
        elif perm[i] == i:
            points[i, 0] = 0.5
    ex = {"image": np.zeros((4, 4, 3), np.uint8), "landmarks": points}
    np.testing.assert_allclose(ops.flip_horizontally(ex, perm)["landmarks"], points, atol=1e-6)
    mirrored_only = ops.flip_horizontally(ex, np.arange(98))["landmarks"]  # no left/right swap
    assert np.abs(mirrored_only - points).max() > 0.1


def test_open_source_reads_a_prepared_dataset_and_names_missing_ones(tmp_path):
    with pytest.raises(ValueError, match="'lfw_subset' is not prepared in data_dir="):
        sources.open_source("lfw_subset", "test", str(tmp_path))
    with pytest.raises(ValueError, match="'nope' is not a registered TFDS builder"):
        sources.open_source("nope", "test", str(tmp_path))
    prepare("lfw_subset", str(tmp_path))
    with pytest.raises(ValueError, match="split='val' is not in dataset 'lfw_subset'"):
        sources.open_source("lfw_subset", "val", str(tmp_path))
    source = sources.open_source("lfw_subset", "test", str(tmp_path))
    preprocess = ops.compose(ops.to_rgb(), ops.resize(32), ops.normalize_to_minus_one_one())
    batches = list(loader.eval_batches(source, preprocess, 16))
    assert [int(b["mask"].sum()) for b in batches] == [16, 16, 8]
    assert batches[0]["image"].shape == (16, 32, 32, 3) and batches[0]["label"].shape == (16,)


def test_closing_or_dropping_an_iterator_stops_its_thread():
    import gc
    import threading

    def prefetch_threads():
        return [t for t in threading.enumerate() if t.name == "input_pipeline_prefetch"]

    batches = loader.train_batches(make_source(8), ops.compose(), 2, seed=0, prefetch=1)
    next(batches)
    batches.close()
    dropped = loader.train_batches(make_source(8), ops.compose(), 2, seed=0, prefetch=1)
    next(dropped)
    del dropped
    gc.collect()
    for thread in prefetch_threads():
        thread.join(timeout=2)
    assert prefetch_threads() == []


def test_config_data_threads_sets_the_loader_threads():
    """`config.data_threads` picks the loader's threads, 0 one per core; batches do not depend
    on it (test_threads_and_prefetch_do_not_change_the_batches)."""
    from jaxmerge import config_lib, run_config

    config = config_lib.base_config()
    assert run_config.data_settings(config).threads == min(32, os.cpu_count() or 1)
    config.data_threads = 3
    assert run_config.data_settings(config).threads == 3
    config.data_threads = -1
    with pytest.raises(ValueError, match="config.data_threads: got -1"):
        config_lib.validate(config)


def augment():
    """AUGMENT, built in each worker process (a closure does not pickle; this function does)."""
    return AUGMENT


class BrokenAfter:
    """Examples 0 to 5 read; later ones fail, as a disk that goes away mid-run."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        if index >= 6:
            raise OSError(f"disk gone at example {index}")
        return make_source(12)[index]


def test_worker_processes_give_the_same_batches_as_this_process():
    """Whole batches prepared by 2 spawned processes: the same training batches from a resumed
    step (straddling epochs), the same eval batches with their padding mask."""
    import functools

    source, built = make_source(10), ops.Built(functools.partial(augment))
    here = take(loader.train_batches(source, AUGMENT, 4, seed=1, start_step=2), 7)
    workers = take(loader.train_batches(source, built, 4, seed=1, start_step=2, num_workers=2), 7)
    assert_batches_equal(here, workers)
    here = list(loader.eval_batches(source, AUGMENT, 4, process_index=1, process_count=2))
    workers = loader.eval_batches(source, built, 4, process_index=1, process_count=2, num_workers=2)
    assert_batches_equal(here, list(workers))


def test_worker_processes_refuse_closures_report_errors_and_stop():
    import functools
    import multiprocessing

    with pytest.raises(ValueError, match="pickle .*or use 0 workers"):
        loader.train_batches(make_source(4), AUGMENT, 2, seed=0, num_workers=2)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        loader.train_batches(make_source(4), AUGMENT, 2, seed=0, num_workers=-1)
    # Epoch 0 (steps 0 to 5 of 2 examples) reads a permutation of all 12: some batch fails.
    batches = loader.train_batches(
        BrokenAfter(), ops.Built(functools.partial(augment)), 2, seed=0, num_workers=2
    )
    with pytest.raises(Exception, match="disk gone at example"):
        take(batches, 6)
    batches.close()
    for worker in multiprocessing.active_children():
        worker.join(timeout=10)
    assert not [p for p in multiprocessing.active_children() if "input_pipeline" in p.name]


def test_config_data_workers_sets_the_loader_processes():
    from jaxmerge import config_lib, config_resume, run_config

    config = config_lib.base_config()
    assert run_config.data_settings(config).workers == 0
    config.data_workers = 64  # at most one per core: a record may come from a bigger machine
    assert run_config.data_settings(config).workers == os.cpu_count()
    config.data_workers = 1
    assert run_config.data_settings(config).workers == 1
    assert "data_workers" in config_resume.RESULT_NEUTRAL  # batches do not depend on it
    config.data_workers = -1
    with pytest.raises(ValueError, match="config.data_workers: got -1"):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "shape,dtype",
    [((5, 7, 3), np.uint8), ((5, 7, 1), np.uint8), ((4, 6, 2), np.uint8), ((4, 6, 3), np.float32)],
)
def test_flip_is_the_reversed_view_as_a_new_writable_array(shape, dtype):
    image = np.random.default_rng(0).integers(0, 255, shape).astype(dtype)
    flipped = ops.flip_horizontally({"image": image}, None)["image"]
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    assert flipped.dtype == dtype and flipped.flags.c_contiguous and flipped.flags.writeable


def test_workers_are_as_many_as_shared_memory_holds_and_none_is_one_line(tmp_path, caplog):
    from jaxmerge.input_pipeline import workers

    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert workers.workers_that_fit(1024, 3, str(tmp_path)) == 3
    # Room for the slots of exactly 2 workers (2 slots each) of a quarter of the free space.
    assert workers.workers_that_fit(free // 4, 3, str(tmp_path)) == 2
    assert "2 of data_workers=3 fit" in caplog.text
    with pytest.raises(ValueError, match=r"need .* MB of shared memory each .*shm-size"):
        workers.workers_that_fit(free, 2, str(tmp_path))


WORKERS_THEN_WAIT = """
import functools, sys, time
sys.path.insert(0, {tests!r})
from jaxmerge.input_pipeline import loader, ops
import test_input_pipeline as t
if __name__ == "__main__":
    batches = loader.train_batches(
        t.make_source(10), ops.Built(functools.partial(t.augment)), 2, seed=0, num_workers=2
    )
    next(batches), next(batches)
    import multiprocessing
    print(*[p.pid for p in multiprocessing.active_children() if "input_pipeline" in p.name])
    sys.stdout.flush()
    time.sleep(600)
"""


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_workers_of_a_killed_process_exit(tmp_path):
    """A main process killed outright (SIGKILL, an out-of-memory kill) runs no clean-up: its
    workers notice it gone and exit instead of waiting forever."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "main.py"
    script.write_text(WORKERS_THEN_WAIT.format(tests=os.path.dirname(__file__)))
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(pid) for pid in main.stdout.readline().split()]
    assert len(pids) == 2
    main.send_signal(signal.SIGKILL)
    main.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        for pid in pids:  # reap them if they are ours (they are the killed process's children)
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.2)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
    assert alive == [], f"workers {alive} outlived their killed main process"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def slow_augment():
    """AUGMENT taking 0.1 s an example, each worker process leaving its pid in the folder
    $JAXMERGE_TEST_WORKERS once it works."""
    import time

    def augment_slowly(example, rng):
        open(os.path.join(os.environ["JAXMERGE_TEST_WORKERS"], str(os.getpid())), "w").close()
        time.sleep(0.1)
        return AUGMENT(example, rng)

    return augment_slowly


@pytest.mark.slow  # CI's own step: keeps the README's suite under 10 minutes
def test_a_worker_killed_mid_run_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A worker killed in the middle of a batch (out of memory, say): that batch never comes,
    and the main process says so instead of waiting forever. (A worker killed while idle
    loses nothing: the others take its share.)"""
    import functools
    import signal

    from jaxmerge.input_pipeline import workers

    monkeypatch.setenv("JAXMERGE_TEST_WORKERS", str(tmp_path))  # inherited by the workers
    # No prefetch thread: each next() hands out jobs, so both workers stay busy (0.2 s a job).
    batches = loader.train_batches(
        make_source(10),
        ops.Built(functools.partial(slow_augment)),
        2,
        seed=0,
        num_workers=2,
        prefetch=0,
    )
    next(batches)  # the first batch, prepared here (its pid is this process's)
    while len(os.listdir(tmp_path)) < 3:  # until both workers are at work
        next(batches)
    worker = int(next(name for name in os.listdir(tmp_path) if int(name) != os.getpid()))
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(workers.WorkerError, match="worker process died"):
        for _ in range(100):  # the batch the dead worker held never comes
            next(batches)
    batches.close()
