"""The project's feature network (adni_diffusers.features) on tiny synthetic data. CPU, seconds."""

import functools
import json

import pytest
import torch
from conftest import toy_slices

from adni_diffusers import features as Fe
from adni_diffusers.data import SliceSet

# A smaller net than the default (input 64 px, narrow), so training takes about a second on CPU.
SETTINGS = dict(
    epochs=2, batch_size=16, lr=3e-3, seed=0, device="cpu", progress=False, widths=(16, 32, 64, 64), input_size=64
)


def _slices(patients, per_patient=6, seed=0, size=256):
    """Two easy classes: 'AD' slices have a bright blob, 'NC' slices do not. Whole patients per class.

    Dark noisy ellipse on black (like a skull-stripped slice); the blob's place varies per slice.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    brain = ((xx - size / 2) / (0.35 * size)) ** 2 + ((yy - size / 2) / (0.42 * size)) ** 2 < 1
    pixels, labels, names, paths = [], [], [], []
    for p in range(patients):
        label = p % 2
        for s in range(per_patient):
            img = torch.where(brain, 60 + 25 * torch.rand(size, size, generator=g), torch.zeros(()))
            if label == 0:
                cy, cx = (torch.rand(2, generator=g) * 0.3 * size + 0.35 * size).tolist()
                img = torch.where((yy - cy) ** 2 + (xx - cx) ** 2 < (0.08 * size) ** 2, torch.full((), 230.0), img)
            pixels.append(img.round().to(torch.uint8))
            labels.append(label)
            names.append(f"pt{seed}_{p:03d}")
            paths.append(f"/data/{'AD' if label == 0 else 'NC'}/pt{seed}_{p:03d}_{80 + s}.jpeg")
    return SliceSet(torch.stack(pixels), torch.tensor(labels), names, paths, ["AD", "NC"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from 2 threads, and on a shared, busy 2-core machine torch's 2 OpenMP
    threads wait on each other: training here took 17 s instead of 1 s under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return _slices(8, seed=0), _slices(4, seed=1)


@pytest.fixture(scope="module")
def trained(data):
    train, val = data
    return Fe.train_feature_net(train, val, **SETTINGS)


def test_trains_and_separates_easy_classes(trained):
    net, report = trained
    assert report["cached"] is False
    assert report["val"]["accuracy"] > 0.9
    assert report["val"]["patient_accuracy"] > 0.9
    assert report["val"]["patients"] == 4
    assert report["position_head_trained"] is True
    assert len(report["history"]) == SETTINGS["epochs"]


def test_features_and_predictions(trained, data):
    net, _ = trained
    _, val = data
    f = net.features(val.pixels, batch_size=7)  # uint8 pixels are accepted, batches are joined
    assert f.shape == (len(val), net.num_features) and f.dtype == torch.float32
    assert torch.allclose(f, net.features(val.pixels.float().unsqueeze(1) / 127.5 - 1), atol=1e-5)
    p = net.predict(val.pixels)
    assert p.shape == (len(val), 2)
    assert torch.allclose(p.sum(1), torch.ones(len(val)), atol=1e-5)
    # the torchmetrics wrapper gives the same features
    assert torch.allclose(net.as_metric_feature()(val.pixels[:3]), f[:3], atol=1e-5)


def test_slice_positions(data):
    train, _ = data
    pos = Fe.slice_positions(train)
    assert pos[:6].tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    odd = SliceSet(train.pixels[:2], train.labels[:2], ["a", "b"], ["/x/a_1.png", "/x/noslice.png"], ["AD", "NC"])
    assert torch.isnan(Fe.slice_positions(odd)).all()  # one slice per patient, or no slice number


def test_augment_keeps_range_and_background():
    x = torch.full((4, 1, 64, 64), -1.0)
    x[:, :, 24:40, 24:40] = 0.5
    y = Fe.augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert (y[:, :, :4, :4] == -1).all()  # background stays black
    assert not torch.equal(y, x)


def test_save_load_round_trip(trained, data, tmp_path):
    net, report = trained
    _, val = data
    Fe.save_feature_net(net, tmp_path / "net", {"note": "round trip", "report": report})
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in (tmp_path / "net").iterdir())
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["class_names"] == ["AD", "NC"] and config["widths"] == list(net.widths)
    loaded = Fe.load_feature_net(tmp_path / "net")
    assert loaded.meta["note"] == "round trip"
    assert torch.equal(loaded.features(val.pixels), net.features(val.pixels))


def test_get_or_train_reuses_the_cache(data, tmp_path):
    train, val = data
    settings = dict(SETTINGS, epochs=1)
    net1, r1 = Fe.get_or_train_feature_net(tmp_path, train, val, **settings)
    assert r1["cached"] is False
    saved = tmp_path / f"feature-net-{r1['key'][:16]}"
    mtime = (saved / "model.safetensors").stat().st_mtime_ns
    net2, r2 = Fe.get_or_train_feature_net(tmp_path, train, val, **settings)
    assert r2["cached"] is True and r2["key"] == r1["key"]
    assert (saved / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    assert torch.equal(net1.features(val.pixels), net2.features(val.pixels))
    assert r2["val"]["accuracy"] == pytest.approx(r1["val"]["accuracy"])
    # the name in the log lines is no training setting: the same net
    _, r3 = Fe.get_or_train_feature_net(tmp_path, train, val, **settings, name="TSTR classifier")
    assert r3["cached"] is True and r3["key"] == r1["key"]
    # other settings or other training pixels: another key
    other = train.subset(range(len(train) - 6))
    assert Fe.training_key(other, {"a": 1}) != Fe.training_key(train, {"a": 1})
    assert Fe.training_key(train, {"a": 2}) != Fe.training_key(train, {"a": 1})
    with pytest.raises(TypeError):
        Fe.get_or_train_feature_net(tmp_path, train, val, epoch=1)


def test_umap_plot_writes_a_png(trained, data, tmp_path):
    net, _ = trained
    train, val = data
    path = Fe.umap_plot(
        net.features(train.pixels), train.labels, net.features(val.pixels), val.labels, ["AD", "NC"],
        tmp_path / "plots" / "umap.png",
    )
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_curves_plot_keys_first_logged_later(tmp_path, monkeypatch):
    """train_vqmodel logs the GAN terms (g_loss, d_loss) only after --disc_start: their panels must still appear."""
    from adni_diffusers import plots

    titles = []
    save = plots.save_figure

    def spy(fig, path, **kw):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    rows = [{"step": 10, "time": 1.0, "loss": 1.0, "lr": 1e-4},
            {"step": 20, "time": 2.0, "loss": 0.9, "lr": 1e-4, "g_loss": 0.5, "d_loss": 1.0}]
    assert plots.plot_loss_curves(rows, tmp_path / "curve.png").is_file()
    assert titles == ["loss", "lr", "g_loss", "d_loss"]
    # a null value is a gap (it raised a TypeError); nothing to plot is said as such (it was a ZeroDivisionError)
    titles.clear()
    rows[1]["g_loss"] = None
    assert plots.plot_loss_curves(rows, tmp_path / "gap.png").is_file() and titles == ["loss", "lr", "d_loss"]
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_loss_curves([{"step": 1, "time": 0.5}], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="a grid of 0 images"):
        plots.grid_columns(0)



def test_loss_curve_panels_draw_isolated_points(tmp_path, monkeypatch):
    """A history of one row (a short run) and a value logged every --codebook_restart_steps only (NaN between)
    drew empty panels: a bare line has nothing to join. Each quantity is drawn over its own rows, with markers."""
    from adni_diffusers import plots

    drawn = {}
    save = plots.save_figure

    def spy(fig, path, **kw):
        for ax in fig.axes:
            if ax.lines:
                line = ax.lines[0]
                drawn[ax.get_title()] = (list(line.get_xdata()), line.get_marker())
        return save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", spy)
    plots.plot_loss_curves([{"step": 2, "time": 1.0, "loss": 0.5}], tmp_path / "one.png")
    assert drawn["loss"] == ([2.0], "o")
    rows = [{"step": 10 * k, "loss": 1.0 / k, **({"restarted_codes": 3.0} if k % 5 == 0 else {})} for k in range(1, 21)]
    plots.plot_loss_curves(rows, tmp_path / "sparse.png")
    assert drawn["restarted_codes"] == ([50.0, 100.0, 150.0, 200.0], "o")


def test_no_images_for_batchnorm_recalibration_keeps_the_training_statistics(data, caplog):
    """bn_images=0 (or 1: no batch of two) recomputes nothing; it used to reset every BatchNorm to mean 0, var 1.
    Its epoch's log line is words and numbers, not a Python dict ("{'epoch': 1, 'loss': 1.236, ...}")."""
    import re

    train, _ = data
    with caplog.at_level("INFO", logger="adni_diffusers.features"):
        net, _ = Fe.train_feature_net(train, None, **dict(SETTINGS, epochs=1, bn_images=0))
    assert re.search(r"epoch 1/1: loss [\d.e+-]+, [^{}]*\d\.\d s$", caplog.text, re.M), caplog.text
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) > 0 for m in bns)  # the steps of training, not a reset
    assert not all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    Fe.recalibrate_batchnorm(net, train.subset([0]))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_an_unwritable_cache_folder_is_refused_before_training(tiny_ldm, tmp_path):
    """It failed after the net was trained (minutes on a CPU), with an OSError that named no option."""
    from adni_diffusers.evaluate import EvaluationError, evaluate_model
    from adni_diffusers.features import check_cache_folder

    a_file = tmp_path / "not_a_folder"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--feature-net-cache .*not_a_folder: cannot write the feature net there"):
        check_cache_folder(a_file, "--feature-net-cache")
    check_cache_folder(tmp_path / "new" / "cache", "--feature-cache")  # made when missing
    assert (tmp_path / "new" / "cache").is_dir() and not list((tmp_path / "new" / "cache").iterdir())
    with pytest.raises(EvaluationError, match="--feature-cache .*not_a_folder"):
        evaluate_model(tiny_ldm, out=tmp_path / "eval", feature_cache=a_file)



@pytest.mark.parametrize("change", [{"epochs": 2}, {"lr": 1e-3}, {"seed": 1}, {"batch_size": 8}])
def test_another_training_setting_is_another_cached_net(data, tmp_path, change):
    """The cache must not hand a 1-epoch net to a run that asked for 2 (evaluate --feature-epochs)."""
    train, val = data
    settings = dict(SETTINGS, epochs=1)
    _, first = Fe.get_or_train_feature_net(tmp_path, train, val, **settings)
    _, second = Fe.get_or_train_feature_net(tmp_path, train, val, **{**settings, **change})
    assert second["cached"] is False and second["key"] != first["key"]


def test_features_and_predictions_leave_a_training_net_in_training_mode():
    """`features` / `predict` run in eval mode (BatchNorm running statistics) and put the net back in the mode
    it was in: called mid-training (the evaluation's TSTR classifier), they must not leave BatchNorm frozen."""
    net = Fe.FeatureNet(2, widths=(8, 8), input_size=32, class_names=["AD", "NC"]).train()
    images = torch.zeros(3, 1, 32, 32)
    net.features(images)
    assert net.training
    net.predict(images)
    assert net.training
    net.eval()
    net.predict(images)
    assert not net.training


def test_slice_positions_follow_the_slice_numbers_not_the_row_order():
    """A patient's slices rank by their NUMBER: files listed in path order put "p_10" before "p_9", and the
    position target must still say p_9 is the lowest of 9, 10, 11."""
    pixels = torch.zeros(3, 256, 256, dtype=torch.uint8)
    rows = SliceSet(pixels, torch.zeros(3, dtype=torch.long), ["p", "p", "p"],
                    ["/x/AD/p_10.png", "/x/AD/p_11.png", "/x/AD/p_9.png"], ["AD"])
    assert Fe.slice_positions(rows).tolist() == pytest.approx([0.5, 1.0, 0.0])


# ------------------------------------------------------------------------------------------ sixth mutation audit


# A still smaller net: 16 px input, two stages of 4 channels; a second or less.
TINY_NET = dict(epochs=1, batch_size=4, seed=0, device="cpu", progress=False, widths=(4, 4), input_size=16, bn_images=8)


def test_metric_feature_wrapper_uses_the_running_statistics_of_a_training_net():
    """`as_metric_feature()` (torchmetrics' FD / KID input): "net.embed in eval mode" even when the net was left in
    training mode, so its features are the same as `features()` gives (not batch statistics); and, as
    `features()` does, it leaves that net in training mode (it left it in eval mode: BatchNorm frozen)."""
    torch.manual_seed(0)
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"]).train()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    expected = net.features(x)
    assert net.training
    torch.testing.assert_close(net.as_metric_feature()(x), expected, atol=1e-5, rtol=0)
    assert net.training


def test_evaluate_feature_net_measures_in_eval_mode_and_changes_nothing():
    """`evaluate_feature_net` measures with the BatchNorm running statistics (eval mode) and leaves a training net
    in training mode with its statistics untouched: it is a measurement, not a training step."""
    torch.manual_seed(0)
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"]).train()
    slices = toy_slices(4, size=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    twin = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"])
    twin.load_state_dict(before)
    out = Fe.evaluate_feature_net(net, slices)
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert out == Fe.evaluate_feature_net(twin.eval(), slices)


def test_patient_accuracy_is_the_call_of_the_mean_probability_over_a_patients_slices():
    """`patient_accuracy`: a patient is called by the mean class probability over all its slices, not by one slice."""
    class Net(torch.nn.Module):
        class_names, num_classes = ["AD", "NC"], 2

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def _device(self, device):
            return torch.device("cpu")

        def forward(self, x):  # P(AD) = sigmoid(mean intensity on [-1, 1])
            a = x.mean(dim=(1, 2, 3))
            return torch.stack([a, torch.zeros_like(a)], 1), torch.zeros_like(a)

    # one AD patient: its first slice leans NC (P(AD) 0.45), the other two AD (0.73): the patient is AD
    pixels = torch.stack([torch.full((8, 8), v, dtype=torch.uint8) for v in (102, 255, 255)])
    slices = SliceSet(pixels, torch.zeros(3, dtype=torch.long), ["p"] * 3, [f"/d/AD/p_{i}.png" for i in range(3)],
                      ["AD", "NC"])
    out = Fe.evaluate_feature_net(Net(), slices)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["patient_accuracy"] == 1.0


def test_a_cached_net_reports_the_held_out_set_it_is_given_now(tmp_path):
    """On a cache hit "the held-out evaluation is recomputed so it refers to this val": another held-out set (e.g.
    counterfactual on another data folder) must not get the numbers of the set the net was first measured on."""
    train = toy_slices(4, size=16, seed=0)
    val1, val2 = toy_slices(4, size=16, seed=1), toy_slices(2, size=16, seed=2)
    _, first = Fe.get_or_train_feature_net(tmp_path, train, val1, **TINY_NET)
    _, second = Fe.get_or_train_feature_net(tmp_path, train, val2, **TINY_NET)
    assert second["cached"] is True and first["val"]["images"] == len(val1)
    assert second["val"]["images"] == len(val2) and second["val"]["patients"] == 2


def test_a_read_only_cache_is_used_for_the_nets_it_holds_and_refused_before_training_another(tmp_path, monkeypatch,
                                                                                             caplog):
    """A labmate's evaluated model on a shared, read-only folder holds its feature net: `evaluate --model` on it
    stopped at "cannot write the feature net there", and with --feature-cache elsewhere trained the same net again
    (minutes on a CPU; on a GPU another yardstick than the one the card's FD was measured with)."""
    train, val = toy_slices(4, size=16, seed=0), toy_slices(4, size=16, seed=1)
    _, first = Fe.get_or_train_feature_net(tmp_path, train, val, **TINY_NET)

    def read_only(cache_dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Fe, "_write_check", read_only)
    with caplog.at_level("WARNING"):
        Fe.check_cache_folder(tmp_path, "--feature-cache")  # not refused: it holds a net
    assert "cannot be written (Permission denied): a feature net cached there is used" in caplog.text
    _, again = Fe.get_or_train_feature_net(tmp_path, train, val, **TINY_NET)
    assert again["cached"] is True and again["weights_sha256"] == first["weights_sha256"]
    @functools.wraps(Fe.train_feature_net)  # (its signature: the settings are checked against it)
    def no_training(*args, **kwargs):
        pytest.fail("trained a net it cannot save")

    monkeypatch.setattr(Fe, "train_feature_net", no_training)
    with pytest.raises(ValueError, match="holds no feature net for this data and recipe .* cannot be saved there"):
        Fe.get_or_train_feature_net(tmp_path, train, val, **{**TINY_NET, "seed": 7})
    with pytest.raises(ValueError, match="--feature-cache .*empty: cannot write the feature net there"):
        Fe.check_cache_folder(tmp_path / "empty", "--feature-cache")  # nothing cached: refused as before


def test_relabelled_training_slices_are_another_cached_net():
    """The cache key covers the labels: the same pixels with other class labels (a fixed labelling error) must not
    reuse the net trained on the old labels."""
    train = toy_slices(4, size=16)
    flipped = SliceSet(train.pixels, 1 - train.labels, train.patients, train.paths, train.class_names)
    assert Fe.training_key(flipped, {"a": 1}) != Fe.training_key(train, {"a": 1})


def test_a_loaded_feature_net_is_in_eval_mode(tmp_path):
    """`load_feature_net`: "Load a net ... in eval mode"."""
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"])
    Fe.save_feature_net(net.train(), tmp_path / "net")
    assert Fe.load_feature_net(tmp_path / "net").training is False


def test_a_config_that_does_not_fit_its_weights_is_refused_before_anything_that_size_is_allocated(tmp_path):
    """A feature-net folder from elsewhere (counterfactual --classifier) whose config.json names absurd widths: the
    net was built as the config said (here 1.4 TB of weights) before the weights' shapes were compared, and torch's
    allocator failed naming no file (or, at a size that fits, filled the memory). The shapes are checked first."""
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"])
    Fe.save_feature_net(net, tmp_path / "net")
    config_file = tmp_path / "net" / Fe.CONFIG_NAME
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "widths": [4, 200_000, 200_000]}))
    with pytest.raises(ValueError, match=r"config.json does not describe model.safetensors .*blocks.1"):
        Fe.load_feature_net(tmp_path / "net")
    config_file.write_text(json.dumps({**config, "widths": [4, 8]}))  # small, and wrong all the same
    with pytest.raises(ValueError, match="does not describe"):
        Fe.load_feature_net(tmp_path / "net")
    config_file.write_text(json.dumps(config))
    loaded = Fe.load_feature_net(tmp_path / "net")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def test_a_net_trained_without_the_last_class_still_has_a_column_per_class_name():
    """The class head has one output per class name even when the training rows lack the last class (slice
    positions give it something to learn): `predict`'s columns follow `class_names`."""
    train = toy_slices(4, size=16, labels=[0, 0, 0, 0])
    net, _ = Fe.train_feature_net(train, None, **TINY_NET)
    assert net.num_classes == 2 and net.predict(train.pixels[:2]).shape == (2, 2)


def test_evaluate_feature_net_restores_training_mode_after_an_error(monkeypatch):
    """An error while measuring (out of memory on a GPU) must not leave a net in training stuck in eval mode."""
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16, class_names=["AD", "NC"]).train()

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(net, "forward", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        Fe.evaluate_feature_net(net, toy_slices(2, size=16))
    assert net.training


def test_a_net_is_scored_by_class_name_not_by_index(trained, data):
    """evaluate_feature_net maps the data's labels onto the net's columns by class name: the same net with its
    columns in the other order (NC, AD), or with a third class, scores the same; data with a class the net does
    not know is refused, naming both lists (counterfactual --classifier can load any saved net)."""
    net, _ = trained
    _, val = data
    before = Fe.evaluate_feature_net(net, val)
    assert before["accuracy"] > 0.9  # a score that a mix-up would change
    swapped = SliceSet(val.pixels, 1 - val.labels, val.patients, val.paths, ["NC", "AD"])
    after = Fe.evaluate_feature_net(net, swapped)
    assert after["accuracy"] == before["accuracy"] and after["accuracy_per_class"] == before["accuracy_per_class"]
    three = SliceSet(val.pixels, val.labels, val.patients, val.paths, ["AD", "NC"])
    net3 = Fe.FeatureNet(3, widths=net.widths, input_size=net.input_size, class_names=["AD", "MCI", "NC"])
    with torch.no_grad():  # the trained net's AD and NC columns, and an MCI column that never wins
        state = net.state_dict()
        w, b = state["classifier.weight"], state["classifier.bias"]
        net3.load_state_dict({**state, "classifier.weight": torch.stack([w[0], w[0] * 0, w[1]]),
                              "classifier.bias": torch.stack([b[0], b[0] * 0 - 1e4, b[1]])})
    scored = Fe.evaluate_feature_net(net3.eval(), three)
    assert scored["accuracy"] == before["accuracy"] and set(scored["accuracy_per_class"]) == {"AD", "NC"}
    with pytest.raises(ValueError, match=r"not \['MCI'\]"):
        Fe.evaluate_feature_net(net, SliceSet(val.pixels, val.labels, val.patients, val.paths, ["AD", "MCI"]))


def test_batches_of_one_are_refused_before_an_untrained_net_is_cached(data):
    """A batch of one row is skipped (BatchNorm): batch_size 1 would train nothing and cache the untrained net."""
    train, val = data
    with pytest.raises(ValueError, match="batch_size >= 2"):
        Fe.train_feature_net(train, val, **{**SETTINGS, "batch_size": 1})


def test_a_umap_of_fewer_than_four_points_is_refused_in_words(trained, data, tmp_path):
    net, _ = trained
    train, _ = data
    feats = net.features(train.pixels[:2])
    with pytest.raises(ValueError, match="at least 4 points; got 2 real and 1 generated"):
        Fe.umap_plot(feats, train.labels[:2], feats[:1], train.labels[:1], ["AD", "NC"], tmp_path / "umap.png")


def test_a_loss_with_values_at_or_below_zero_keeps_a_linear_axis(tmp_path, monkeypatch):
    from adni_diffusers import plots

    figs = []
    real_save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(
        {ax.get_title(): ax.get_yscale() for ax in fig.axes if ax.get_title()}) or real_save(fig, path, **kw))
    rows = [{"step": s, "loss": 10.0 ** -s, "g_loss": 0.5 - 0.2 * s, "lr": 1e-3} for s in (1, 2, 3)]  # a decade+
    plots.plot_loss_curves(rows, tmp_path / "c.png")
    assert figs[0] == {"loss": "log", "g_loss": "linear", "lr": "linear"}


# --- mutation audit 2026-12-05


def test_features_are_the_global_average_of_the_last_stage():
    """The embedding is "the 256-d global-average-pooled output of the last stage" (the penultimate layer): not a max
    over positions, not an earlier stage."""
    torch.manual_seed(0)
    net = Fe.FeatureNet(2, widths=(4, 6), input_size=16).eval()
    seen = []
    net.blocks.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    f = net.features(x)
    assert f.shape == (3, 6)
    torch.testing.assert_close(f, seen[-1].mean(dim=(2, 3)), atol=1e-6, rtol=0)


def test_larger_slices_are_box_filtered_down_to_the_input_size():
    """256 px slices reach a 128 px net as exact 2 x 2 means (a box filter), so the features of an image and of its
    2 x 2 average are the same (nearest-neighbour resizing would drop 3 of 4 pixels)."""
    torch.manual_seed(0)
    net = Fe.FeatureNet(2, widths=(4, 4), input_size=16).eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(net.features(x), net.features(torch.nn.functional.avg_pool2d(x, 2)), atol=1e-6, rtol=0)


def test_position_error_is_the_mean_absolute_error_of_the_clamped_prediction():
    """`position_mae`: mean |clamp(predicted, 0, 1) - true position| over slices with a known position (positions
    run 0 .. 1, so a prediction beyond them counts as the nearest end)."""
    class Net(torch.nn.Module):
        class_names, num_classes = ["AD", "NC"], 2

        def __init__(self, positions):
            super().__init__()
            self.positions = torch.tensor(positions)

        def _device(self, device):
            return torch.device("cpu")

        def forward(self, x):  # one batch: the rows' positions in order
            return torch.zeros(len(x), 2), self.positions[: len(x)]

    slices = toy_slices(2, per_patient=3, size=8)  # true positions 0, 0.5, 1 for each patient
    assert Fe.slice_positions(slices).tolist() == [0, 0.5, 1, 0, 0.5, 1]
    out = Fe.evaluate_feature_net(Net([-0.5, 0.5, 0.9, 1.4, 0.2, 1.0]), slices)
    assert out["position_mae"] == pytest.approx((0 + 0 + 0.1 + 1.0 + 0.3 + 0) / 6)


def test_the_floors_patients_are_whole_patients_the_net_does_not_train_on():
    """A seeded half of each class's training patients is kept out of the net's training for the evaluation's
    floor (whole patients; half, so that the floor's slices come from many brains, as samples do); the same data
    gives the same patients (evaluate and counterfactual share the net)."""
    train = toy_slices(patients=13, per_patient=3, seed=0)  # 7 patients of AD, 6 of NC, 3 slices each
    held_out = toy_slices(patients=4, per_patient=4, seed=1)
    net_train, floor_rows = Fe.set_aside_floor_patients(train, held_out)
    floor_patients = {train.patients[i] for i in floor_rows.tolist()}
    assert not floor_patients & set(net_train.patients)
    assert sorted(net_train.paths + [train.paths[i] for i in floor_rows.tolist()]) == sorted(train.paths)
    for label, half in ((0, 3), (1, 3)):
        of_class = {p for p, y in zip(train.patients, train.labels.tolist()) if y == label}
        assert len(of_class & floor_patients) == half
    again = Fe.set_aside_floor_patients(train, held_out)
    assert torch.equal(again[1], floor_rows) and again[0].paths == net_train.paths
    # the draw depends on the training patients only (a fixed seed): another held-out set, the same rows
    assert torch.equal(Fe.set_aside_floor_patients(train, toy_slices(patients=6, per_patient=2, seed=2))[1],
                       floor_rows)

    # a class that nothing held out has keeps all its patients
    only_ad = toy_slices(patients=2, per_patient=2, seed=1, labels=[0, 0])
    rows = Fe.set_aside_floor_patients(train, only_ad)[1]
    assert set(train.labels[rows].tolist()) == {0}
    # a class of one training patient: nothing can be kept out, the net trains on everything
    lonely = toy_slices(patients=3, per_patient=3, seed=0, labels=[0, 0, 1])
    net_train, floor_rows = Fe.set_aside_floor_patients(lonely, held_out)
    assert floor_rows is None and net_train is lonely


def test_a_net_of_unnamed_classes_fewer_than_the_datas_is_refused_not_an_index_error():
    """A feature net trained on an unlabelled folder (one unnamed class) given as counterfactual's --classifier of a
    3-class model ended in "IndexError: list index out of range"."""
    net = Fe.FeatureNet(1, widths=(4, 4), input_size=16, class_names=[])
    slices = toy_slices(4, size=16, labels=[0, 1, 2, 1])
    slices.class_names = ["AD", "CN", "MCI"]
    with pytest.raises(ValueError, match="unnamed class"):
        Fe.evaluate_feature_net(net, slices)
