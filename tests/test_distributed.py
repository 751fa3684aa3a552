"""Multi-process fitting and scoring (torch.distributed, gloo on 127.0.0.1): exact, and failing as one.

Every multi-process test starts 2 real processes (spawn, or ``torchrun`` for the command line)
that talk over loopback TCP; expectations are computed in this process, independently.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from utils.distributed import DistributedContext, shard_dataset
from utils.evaluation import run_fit
from utils.errors import DistributedError
from utils.padim.gaussian import GaussianStatistics
from utils.padim.model import Padim

WORLD = 2
POSITIONS, DIM = 3, 5
#: (samples on rank 0, samples on rank 1, scatter dtype) of each all_reduce case.
REDUCE_CASES = {
    "uneven": (7, 13, "float32"),
    "rank0_empty": (0, 11, "float32"),
    "rank1_empty": (9, 0, "float32"),
    "one_sample": (1, 6, "float64"),
}


# ---------------------------------------------------------------------------- helpers
#: Keep gloo on the loopback interface (Linux "lo", macOS "lo0") whatever the host name resolves to.
LOOPBACK_ENV = {
    "GLOO_SOCKET_IFNAME": name for _, name in socket.if_nameindex() if name in ("lo", "lo0")
}


def _precision(model):
    """The fitted precisions, ``(L L^T)^-1`` of the stored Cholesky factors by numpy, to compare with numpy's inverses."""
    factors = model.cholesky.double().numpy()
    return torch.from_numpy(np.linalg.inv(factors @ factors.transpose(0, 2, 1)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(target, *args, timeout: float = 120) -> list[int]:
    """Run ``target(rank, port, *args)`` in WORLD spawned processes; return their exit codes."""
    spawn = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [spawn.Process(target=target, args=(rank, port, *args)) for rank in range(WORLD)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    return [process.exitcode for process in processes]


def _join_group(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(LOOPBACK_ENV)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )


def _as_torchrun_rank(rank: int, port: int) -> None:
    """Set the environment torchrun gives a worker, so that DistributedContext finds it."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **LOOPBACK_ENV,
    )


def _case_samples(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``(N, d, 1, P)`` of both ranks; rank 1's are shifted so the merge correction matters."""
    n0, n1, _ = REDUCE_CASES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    scale = rng.uniform(0.5, 2.0, size=(1, DIM, 1, POSITIONS))
    first = rng.normal(size=(n0, DIM, 1, POSITIONS)) * scale + 3.0
    second = rng.normal(size=(n1, DIM, 1, POSITIONS)) * scale - 2.0
    return first, second


# ---------------------------------------------------------------------------- workers (child processes)
def _collectives_worker(rank: int, port: int, out: str) -> None:
    from utils.distributed import all_reduce_statistics

    _join_group(rank, port)
    try:
        for name, (_, _, dtype) in REDUCE_CASES.items():
            samples = _case_samples(name)[rank]
            stats = GaussianStatistics.empty(POSITIONS, DIM, dtype=getattr(torch, dtype))
            for batch in np.array_split(samples, 3):  # several updates, some possibly empty
                stats.update(torch.from_numpy(batch))
            all_reduce_statistics(stats)
            torch.save({"count": stats.count, "mean": stats.mean, "scatter": stats.scatter}, f"{out}/{name}_{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _failing_fit_worker(rank: int, port: int, config: str, output: str, how: str, out: str) -> None:
    from utils.config import load_config

    _as_torchrun_rank(rank, port)
    os.environ["PADIM_DIST_TIMEOUT"] = "60"
    if rank == 1:  # its 6th image (in its second batch) cannot be read: it fails mid-accumulation
        from utils.data import ImageSet

        original, calls = ImageSet.__getitem__, []

        def getitem(self, index):
            calls.append(index)
            if len(calls) == 6:
                if how == "crash":
                    os._exit(3)
                raise OSError("injected failure: cannot read slice 17")
            return original(self, index)

        ImageSet.__getitem__ = getitem
    try:
        run_fit(load_config(config), output, progress=False)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        outcome = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    with open(f"{out}/outcome_{rank}.txt", "w", encoding="utf-8") as handle:
        handle.write(outcome)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("collectives"))
    codes = _launch(_collectives_worker, out)
    assert codes == [0, 0], f"worker exit codes {codes}"
    return out


@pytest.fixture(scope="module")
def demo_config(tmp_path_factory):
    """A small demo set (19 training images: an uneven split) and a 64 px efficientnet_lite0 config
    with 10 channels (fewer than the images, so the covariances are well determined)."""
    from utils.data.demo.brains import DemoCounts, generate_demo

    folder = tmp_path_factory.mktemp("demo")
    root = generate_demo(folder / "demo", counts=DemoCounts(ixi_train=12, fastmri_train=7, val=2, per_kind=1, normal_test=2))
    config = {
        "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 64, "output_dimension": 10,
        "target_dimension": None, "device": "cpu", "batch_size": 4, "results_dir": str(folder / "results"),
        "data": {"format": "demo", "root": root},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ---------------------------------------------------------------------------- tests
def test_shards_cover_every_index_exactly_once():
    for n in (0, 1, 5, 19, 64):
        for world in (1, 2, 3, 8):
            shards = [list(shard_dataset(list(range(n)), DistributedContext(rank, world))) for rank in range(world)]
            assert sorted(i for shard in shards for i in shard) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert list(shard_dataset(list(range(5)), DistributedContext(1, 2))) == [1, 3]


def test_single_process_context_is_a_no_op(small_settings, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with DistributedContext.from_settings(small_settings) as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
        assert not torch.distributed.is_initialized()
        with pytest.raises(KeyError):  # alone, a local error propagates unchanged
            ctx.agree("testing", lambda: {}["missing"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK=2, WORLD_SIZE=2"):
        DistributedContext.from_settings(small_settings)


@pytest.mark.parametrize("case", list(REDUCE_CASES))
def test_all_reduce_equals_mean_and_covariance_of_all_samples(collectives, case):
    first, second = _case_samples(case)
    everything = np.concatenate([first, second])  # (N, d, 1, P)
    per_position = everything[:, :, 0, :].transpose(2, 0, 1)  # (P, N, d)
    expected_mean = per_position.mean(axis=1)
    expected_cov = np.stack([np.cov(x, rowvar=False) for x in per_position])
    # update() embeds samples in the scatter dtype, so a float32 case is exact to float32 rounding
    tolerance = 1e-5 if REDUCE_CASES[case][2] == "float32" else 1e-12
    results = [torch.load(f"{collectives}/{case}_{rank}.pt") for rank in range(WORLD)]
    for result in results:
        assert result["count"] == len(everything)
        np.testing.assert_allclose(result["mean"].numpy(), expected_mean, rtol=tolerance, atol=tolerance)
        covariance = result["scatter"].double().numpy() / (len(everything) - 1)
        np.testing.assert_allclose(covariance, expected_cov, rtol=tolerance, atol=tolerance)
    assert torch.equal(results[0]["scatter"], results[1]["scatter"])  # every rank holds the same result


def test_torchrun_evaluate_writes_one_folder_with_the_single_process_metrics(demo_config, tmp_path, monkeypatch):
    """Every rank fits its shard; rank 0 alone scores and writes: one results folder, one summary,
    the metrics of a single process up to the float32 rounding of the sharded fit."""
    import pandas as pd

    from utils.config import load_config
    from utils.evaluation import run_evaluation

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(demo_config)
    two, one = tmp_path / "two", tmp_path / "one"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.replace(results_dir=str(two)).to_dict()))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "utils", "evaluate", "--config", str(tmp_path / "c.yaml"),
               "--no-figures", "--quiet"]
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1", "PADIM_DIST_TIMEOUT": "60"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("results written to") == 1  # rank 0 only
    run = run_evaluation(config.replace(results_dir=str(one)), progress=False, figures=False)
    assert os.listdir(two) == [run.name]  # the same run name: the same settings and files
    expected = pd.read_csv(os.path.join(run.directory, "metrics.csv"))
    got = pd.read_csv(os.path.join(two, run.name, "metrics.csv"))
    numbers = expected.select_dtypes("number").columns
    np.testing.assert_allclose(got[numbers].to_numpy(), expected[numbers].to_numpy(), rtol=1e-3, atol=1e-3)


def test_torchrun_two_process_fit_equals_single_process_fit(demo_config, tmp_path, monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    distributed_path = tmp_path / "two" / "model.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", "-m", "utils", "fit", "--config", demo_config,
        "--output", str(distributed_path), "--quiet",
    ]
    env = {**os.environ, **LOOPBACK_ENV, "OMP_NUM_THREADS": "1", "PADIM_DIST_TIMEOUT": "60"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("model written to") == 1  # rank 0 only

    from utils.config import load_config

    single_path = run_fit(load_config(demo_config), str(tmp_path / "one" / "model.pt"), progress=False)
    one, two = Padim.load(single_path), Padim.load(distributed_path)
    assert one.train_count == two.train_count == 19
    # float32 scatter: both fits fold the same samples in, in another order, so they agree to float32
    # rounding (measured: mean 5e-6 abs, precision 2e-5 relative per position - the same as changing
    # batch_size in a single-process fit; float64 agrees to 1e-13)
    mean_one, mean_two = one.mean.numpy(), two.mean.numpy()
    np.testing.assert_allclose(mean_two, mean_one, rtol=1e-4, atol=1e-5 * np.abs(mean_one).max())
    p_one, p_two = _precision(one).double().numpy(), _precision(two).double().numpy()
    per_position = np.linalg.norm(p_two - p_one, axis=(1, 2)) / np.linalg.norm(p_one, axis=(1, 2))
    assert per_position.max() < 2e-4, per_position.max()
    np.testing.assert_allclose(p_two, p_one, rtol=1e-3, atol=1e-4 * np.abs(p_one).max())
    assert os.listdir(tmp_path / "two") == ["model.pt"]


@pytest.mark.parametrize("how", ["raise", "crash"])
def test_a_failing_rank_fails_the_whole_run_and_writes_no_model(demo_config, tmp_path, how):
    output = tmp_path / "models" / "model.pt"
    codes = _launch(_failing_fit_worker, demo_config, str(output), how, str(tmp_path), timeout=150)
    outcome = {rank: (tmp_path / f"outcome_{rank}.txt") for rank in range(WORLD)}
    assert outcome[0].exists(), f"rank 0 recorded nothing (exit codes {codes})"
    first_line = outcome[0].read_text().splitlines()[0]
    assert first_line.startswith("DistributedError:"), (codes, outcome[0].read_text())
    if how == "raise":
        assert codes == [0, 0]
        for rank in range(WORLD):  # every rank learns who failed, and why
            line = outcome[rank].read_text().splitlines()[0]
            assert line.startswith("DistributedError: rank 1 of 2 failed while accumulating"), line
            assert "injected failure: cannot read slice 17" in line and "no model was written" in line
    else:
        assert codes[1] == 3 and "lost contact with the other ranks" in first_line
    assert not output.exists()
    assert not output.parent.exists() or os.listdir(output.parent) == []
