"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def hub_stub(monkeypatch, tmp_path):
    """A running local stand-in for the Hub API (tests/hub_stub.py), with huggingface_hub pointed at it.

    In this process huggingface_hub uses the stub as its endpoint, an empty HF_HOME under tmp_path,
    online mode and no token from the environment; the same settings are in os.environ for
    subprocesses. Everything is undone after the test. Valid token: `hub_stub.token`.
    """
    from hub_stub import HubStub, point_huggingface_hub_at

    with HubStub() as stub:
        point_huggingface_hub_at(stub, monkeypatch, tmp_path / "hf_home")
        yield stub
    from huggingface_hub.utils import close_session

    close_session()  # drop pooled connections to the stopped stub


# Module-scoped fixtures that cost a training, benchmark or evaluation run. The tests that use one run on one xdist
# worker (setup.cfg: --dist loadgroup), so that it is built once: spread over two workers, `smoke` was built twice,
# side by side (45 s each).
SHARED_COSTLY_FIXTURES = ("smoke", "pushed_run", "evaluated", "stub_evaluated", "stub_seeded")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        shared = [name for name in SHARED_COSTLY_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{shared[0]}"))


@pytest.fixture(autouse=True)
def close_figures():
    """Close what a test left open in pyplot: tests that stand in for save_figure (to read a figure's panels) skip
    its close, and each figure stayed in the worker's memory for the session (a worker held 9)."""
    yield
    import sys

    if (plt := sys.modules.get("matplotlib.pyplot")) is not None:
        plt.close("all")


# --------------------------------------------------------------------------------------------------
# Offline, isolated Hugging Face caches for the whole suite (set before anything imports the libraries)
# and small trained models shared by many tests.
# --------------------------------------------------------------------------------------------------
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "HF_HOME" not in os.environ:  # an empty cache of our own, removed when the test session ends
    import atexit
    import shutil

    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="adni_diffusers_test_hf_")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several workers (setup.cfg: one per core): a thread each, not
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a thread per core each (set before torch is imported)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # tests import each other's helpers (hub_stub, conftest)


def image_mode(path) -> str:
    """An image file's PIL mode, with the file closed again (no ResourceWarning)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.mode


def wait_until(condition, seconds: float, every: float = 0.05) -> None:
    """Poll `condition()` until it is true or `seconds` have passed (the caller asserts what it needs)."""
    import time

    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(every)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; a second in-process training run needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_training_script(name: str, argv: list[str]):
    """Run train_vqmodel.py / train_unet.py in this process (single process, CPU) and return main()'s result."""
    import importlib

    module = importlib.import_module(f"adni_diffusers.{name}")
    reset_accelerate()
    try:
        return module.main(module.parse_args([str(a) for a in argv]))
    finally:
        reset_accelerate()


def checkpoint_accelerator(out_features: int = 2, optimizer: bool = False):
    """A fresh single-process CPU Accelerator with one prepared model (and its AdamW, with `optimizer`): enough for
    save_state / load_state."""
    import torch
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, out_features)
    accelerator.prepare(model, *([torch.optim.AdamW(model.parameters())] if optimizer else []))
    return accelerator


class another_process_holding:
    """A process of its own that holds `folder`'s lock (files.only_writer) as a run of `what` holds it (a first run
    loading its data, an evaluation writing its report), until the block ends; `.pid` is its process id."""

    def __init__(self, folder, flag: str, what: str):
        self.args = [str(folder), flag, what]

    def __enter__(self):
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom adni_diffusers.files import "
             "only_writer\nwith only_writer(Path(sys.argv[1]), sys.argv[2], sys.argv[3]):\n"
             "    print('held', flush=True)\n    time.sleep(120)\n", *self.args], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"
        self.pid = self.process.pid
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


def run_stopped_by_sigterm(name: str, argv: list, monkeypatch, when) -> int:
    """Run train_vqmodel / train_unet through its command line in this process with SIGTERM (a cluster's time
    limit) sent during the step for which `when(run)` is true (`run.global_step` is the step before it); returns
    the exit code. The run's own handler must catch it: a regression fails the test, not pytest."""
    import importlib
    import signal

    from adni_diffusers import training

    module = importlib.import_module(f"adni_diffusers.{name}")
    original = training.TrainingRun.end_step

    def end_step(self, logs):
        if when(self):
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, logs)

    def not_caught(signum, frame):
        raise AssertionError("the training run did not catch SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(training.TrainingRun, "end_step", end_step)
        before = signal.signal(signal.SIGTERM, not_caught)
        reset_accelerate()
        try:
            rc = module.cli([str(a) for a in argv])
            assert signal.getsignal(signal.SIGTERM) is not_caught  # given back: the handler is the run's only
        finally:
            signal.signal(signal.SIGTERM, before)
            reset_accelerate()
    return rc


class StopRun(Exception):
    """Raised from a patched function to end a training run once a test has seen what it needs."""


TINY_VQ_ARGS = ["--preset", "tiny", "--train_batch_size", "4", "--eval_batch_size", "8", "--logging_steps", "2",
                "--save_images_steps", "2", "--lr_warmup_steps", "0", "--report_to", "none"]
TINY_UNET_ARGS = ["--preset", "tiny", "--train_batch_size", "4", "--eval_batch_size", "8", "--logging_steps", "2",
                  "--sample_inference_steps", "3", "--num_sample_images", "2", "--save_images_epochs", "1",
                  "--lr_warmup_steps", "0",
                  "--report_to", "none"]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A tiny synthetic demo set: 8 subjects x 4 slices, split by subject."""
    from adni_diffusers.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "AD_NC"
    build_demo_dataset(root, subjects=8, slices_per_subject=4, seed=0, workers=1, contact_sheet=False)
    return root


@pytest.fixture(scope="session")
def tiny_vq(demo_root, tmp_path_factory) -> Path:
    """The output folder of a 4-step tiny VQModel run on the demo set."""
    out = tmp_path_factory.mktemp("vq") / "vq"
    run_training_script("train_vqmodel", ["--train_data_dir", demo_root, "--output_dir", out,
                                          "--max_train_steps", "4", *TINY_VQ_ARGS])
    return out


@pytest.fixture
def vq(tiny_vq, tmp_path):
    """A copy of tiny_vq's folder that a test may change (the session fixture stays untouched)."""
    import shutil

    return Path(shutil.copytree(tiny_vq, tmp_path / "tiny-vq", ignore=shutil.ignore_patterns("latent_cache")))


@pytest.fixture(scope="session")
def tiny_ldm(demo_root, tiny_vq, tmp_path_factory) -> Path:
    """A saved class-conditional pipeline: tiny UNet trained 4 steps (with EMA) on tiny_vq's latents."""
    out = tmp_path_factory.mktemp("ldm") / "ldm"
    run_training_script("train_unet", ["--vqmodel", tiny_vq, "--train_data_dir", demo_root, "--output_dir", out,
                                       "--max_train_steps", "4", "--conditional", "--use_ema", *TINY_UNET_ARGS])
    return out


def toy_slices(patients=4, per_patient=3, size=32, seed=0, labels=None) -> "SliceSet":
    """Small uint8 slices named `<patient>_<slice>.png` (so slice positions exist), whole patients per class."""
    import torch

    from adni_diffusers.data import SliceSet

    g = torch.Generator().manual_seed(seed)
    pixels, ys, names, paths = [], [], [], []
    for p in range(patients):
        y = (p % 2) if labels is None else labels[p]
        for s in range(per_patient):
            pixels.append(torch.randint(0, 256, (size, size), dtype=torch.uint8, generator=g))
            ys.append(y)
            names.append(f"p{seed}{p}")
            paths.append(f"/d/{'AD' if y == 0 else 'NC'}/p{seed}{p}_{10 + s}.png")
    return SliceSet(torch.stack(pixels), torch.tensor(ys), names, paths, ["AD", "NC"])


def tensorboard_hparams_experiment(logdir):
    """The HParams tab's columns for `tensorboard --logdir logdir`, as TensorBoard's own backend works them out."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context

    runs = plugin_event_multiplexer.EventMultiplexer()
    runs.AddRunsFromDirectory(str(logdir))
    runs.Reload()
    backend = backend_context.Context(base_plugin.TBContext(
        logdir=str(logdir), multiplexer=runs, data_provider=data_provider.MultiplexerDataProvider(runs, str(logdir))))
    ctx = context.RequestContext()
    return backend.experiment_from_metadata(ctx, "", True, backend.hparams_metadata(ctx, ""),
                                            backend.hparams_from_data_provider(ctx, "", limit=None))
