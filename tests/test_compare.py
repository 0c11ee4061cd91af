"""`evaluate --compare-with` (adni_diffusers.compare): a paired FD comparison of two evaluations of one data set,
split, feature net, seed and sample count, and its refusals of evaluations that do not share them. The models are
stand-ins (test_evaluate's _StubPipe: uniform noise, or darker noise), on the tiny demo set."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from test_evaluate import FEW_RESAMPLES, _stub_model_folder, _StubPipe

from adni_diffusers import cli
from adni_diffusers import compare as C
from adni_diffusers import evaluate as E

SETTINGS = dict(num_samples=4, steps=2, seed=0, feature_epochs=1, tstr_epochs=1, diversity_pairs=2, kid_subsets=2,
                feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                fd_resamples=FEW_RESAMPLES, umap=False, render_card=False, progress=False, device="cpu")


class _DarkPipe(_StubPipe):
    """Another "model": the stand-in's noise at a quarter of its brightness, from the same generators."""

    def __call__(self, batch_size, generator, **kw):
        return SimpleNamespace(images=super().__call__(batch_size, generator, **kw).images / 4)


@pytest.fixture(scope="module")
def first(demo_root, tmp_path_factory):
    """One evaluation of a stand-in model, with its features saved, to compare others with."""
    model = _stub_model_folder(tmp_path_factory.mktemp("compare") / "model", demo_root)
    out = model.parent / "first"
    return model, out, E.evaluate_model(model, out=out, pipe=_StubPipe(), **SETTINGS)


def test_an_evaluation_saves_its_samples_features_and_nothing_of_the_real_slices(first):
    model, out, result = first
    baseline = C.read_baseline(out)
    assert result["files"]["features"] == C.FEATURES_FILE
    n = result["realism"]["generated"]["candidate_images"]
    assert baseline["generated"].shape == (n, result["realism"]["generated"]["feature_dims"])
    assert baseline["groups"].tolist() == [0] * 4 + [1] * 4  # 4 per class, in class order
    assert baseline["net_sha256"] == result["feature_net"]["weights_sha256"]
    assert baseline["sampling"]["seed"] == 0 and baseline["sampling"]["image_seed"] == E.IMAGE_SEED_RULE
    from safetensors.torch import load_file

    assert set(load_file(str(out / C.FEATURES_FILE))) == {"generated", "groups"}
    # the FD the evaluation reported is of these rows
    from adni_diffusers import metrics as M

    assert M.frechet_distance(_held_out_features(model, out), baseline["generated"]) == \
        pytest.approx(result["realism"]["generated"]["fd"], rel=1e-6)


def test_a_push_leaves_the_features_file_out(first, tmp_path):
    """The features file stays with the evaluation on disk; a push of the model uploads the report and metrics."""
    from adni_diffusers.hub import select_upload_files

    model, out, _ = first
    folder = tmp_path / "model"
    shutil.copytree(model, folder, ignore=shutil.ignore_patterns("feature_net"))
    shutil.copytree(out, folder / "evaluation")
    kind, files = select_upload_files(folder)
    assert kind == "pipeline" and "evaluation/metrics.json" in files
    assert "evaluation/" + C.FEATURES_FILE not in files


def _held_out_features(model, out):
    """The held-out rows the first evaluation compared with, measured again in its cached net."""
    from adni_diffusers import features as Fe
    from adni_diffusers.data import load_slices

    record = json.loads((out / "metrics.json").read_text())
    data = load_slices(record["data"]["root"], split="patient", val_fraction=0.5, seed=0)
    net = Fe.load_feature_net(record["feature_net"]["path"])
    held_idx = E.subsample(data.val.labels, {0: 4, 1: 4}, 0)
    return E.extract_features(net, data.val.pixels[held_idx], batch_size=64, device="cpu", progress=False)


def test_a_paired_comparison_gives_the_fd_gain_and_its_range(first, tmp_path, capsys):
    model, out, result = first
    fd_first = result["realism"]["generated"]["fd"]
    # the same model again, compared with itself: the same samples, no gain, a range of nothing
    same = E.evaluate_model(model, out=tmp_path / "same", pipe=_StubPipe(), compare_with=out, **SETTINGS)
    c = same["comparison"]
    assert c["fd"] == pytest.approx(fd_first) and c["this_fd"] == pytest.approx(fd_first)
    assert c["fd_gain"] == pytest.approx(0, abs=1e-9) and c["fd_gain_interval"] == pytest.approx([0, 0], abs=1e-9)
    assert c["verdict"].startswith("not told apart")
    # another "model" from the same noise: its gain is (FD theirs - FD ours) / FD theirs, the range around it
    dark = E.evaluate_model(model, out=tmp_path / "dark", pipe=_DarkPipe(), compare_with=model.parent / "first",
                            **SETTINGS)
    c, fd_dark = dark["comparison"], dark["realism"]["generated"]["fd"]
    assert c["with"] == str(out) and c["fd"] == pytest.approx(fd_first) and c["this_fd"] == pytest.approx(fd_dark)
    assert fd_dark != pytest.approx(fd_first, rel=1e-3)
    assert c["fd_gain"] == pytest.approx((fd_first - fd_dark) / fd_first)
    low, high = c["fd_gain_interval"]
    assert low <= c["fd_gain"] <= high
    assert (low > 0) == (c["fd_gain"] > 0) and (high < 0) == (c["fd_gain"] < 0)  # the gain's side, not the other's
    assert c["verdict"].startswith("lower FD" if low > 0 else "higher FD" if high < 0 else "not told apart")
    assert json.loads((tmp_path / "dark" / "metrics.json").read_text())["comparison"]["fd_gain"] == \
        pytest.approx(c["fd_gain"])
    report = (tmp_path / "dark" / "report.md").read_text()
    assert "## Against another evaluation (paired)" in report and f"{100 * c['fd_gain']:+.1f}%" in report
    # a section of its own: the summary's notes (the memorisation ranges) stay above it, under the summary
    section = report.split("## Against another evaluation (paired)")[1].split("\n## ")[0]
    assert "memorisation shares' ranges" not in section and "## Against" not in report.split("## Summary")[0]
    for label, key in (("KID (adni-features)", "kid"), ("recall", "recall")):  # the other measures, side by side
        theirs, ours = result["realism"]["generated"][key], dark["realism"]["generated"][key]
        assert f"| {label} | {theirs:.4g} | {ours:.4g} |" in report
    assert f"| MS-SSIM of random pairs (diversity) | {result['diversity']['generated']['mean']:.4g} | " \
           f"{dark['diversity']['generated']['mean']:.4g} |" in report
    # the reverse comparison: the dark one as the baseline
    back = E.evaluate_model(model, out=tmp_path / "back", pipe=_StubPipe(), compare_with=tmp_path / "dark",
                            **SETTINGS)["comparison"]
    assert back["fd_gain"] == pytest.approx((fd_dark - fd_first) / fd_dark)
    assert (back["fd_gain"] > 0) != (c["fd_gain"] > 0)


@pytest.mark.parametrize("change, message", [
    ({"seed": 1}, r"ran with --seed 0, this one with --seed 1; .* give --seed 0"),
    ({"num_samples": 3}, r"ran with --num-samples 4, this one with --num-samples 3"),
    ({"feature_net_seed": 1}, r"measured in another feature net"),
])
def test_evaluations_that_do_not_share_the_noise_or_the_net_are_refused_before_sampling(first, tmp_path, change,
                                                                                       message, monkeypatch):
    model, out, _ = first

    def no_sampling(*a, **kw):
        raise AssertionError("sampled before the comparison was refused")

    monkeypatch.setattr(E, "sample_images", no_sampling)
    with pytest.raises(E.EvaluationError, match=message):
        E.evaluate_model(model, out=tmp_path / "other", pipe=_StubPipe(), compare_with=out, **{**SETTINGS, **change})


def test_another_split_is_refused(first, tmp_path):
    """A model trained on another split of the same data (here another --val_fraction) is measured in another net
    (the cache key is the training split) against other held-out patients: refused, with what would make the two
    comparable."""
    model, out, _ = first
    other = _stub_model_folder(tmp_path / "model", json.loads((out / "metrics.json").read_text())["data"]["root"])
    (other / "training_args.json").write_text(json.dumps({"val_fraction": 0.25, "seed": 0}))
    settings = {**SETTINGS, "num_samples": 2}
    E.evaluate_model(other, out=tmp_path / "a", pipe=_StubPipe(), **settings)
    with pytest.raises(E.EvaluationError, match="another feature net .*another --seed without --split_seed"):
        E.evaluate_model(model, out=tmp_path / "b", pipe=_StubPipe(), compare_with=tmp_path / "a", **settings)


def test_other_held_out_slices_or_counts_are_refused_even_in_one_net(first):
    """The net alone does not make two evaluations comparable: the held-out rows (their names and classes) and the
    generated rows per class must be the same too."""
    _, out, result = first
    baseline = C.read_baseline(out)
    net = result["feature_net"]["weights_sha256"]
    same = dict(net_sha256=net, reference_sha256=baseline["reference_sha256"],
                images_per_class={"AD": 4, "NC": 4}, groups=baseline["groups"])
    C.check_same_yardstick(baseline, **same)  # itself: accepted
    for unknown in (None, ""):  # a net whose weights' digest is unknown is no yardstick to share
        with pytest.raises(C.ComparisonError, match="another feature net"):
            C.check_same_yardstick({**baseline, "net_sha256": unknown}, **{**same, "net_sha256": unknown})
    names = [f"p{i}_1.png" for i in range(8)]
    groups = torch.tensor([0] * 4 + [1] * 4)
    assert C.reference_digest(names, groups) == C.reference_digest([f"/elsewhere/{n}" for n in names], groups)
    assert C.reference_digest(names, groups) != C.reference_digest(names[::-1], groups)
    with pytest.raises(C.ComparisonError, match="other held-out slices"):
        C.check_same_yardstick(baseline, **{**same, "reference_sha256": C.reference_digest(names, groups)})
    with pytest.raises(C.ComparisonError, match=r"compared \{'AD': 4, 'NC': 4\} images per class, this one"):
        C.check_same_yardstick(baseline, **{**same, "images_per_class": {"AD": 3, "NC": 3}})


def test_the_evaluation_in_out_may_be_the_one_compared_with_and_a_refusal_keeps_it(first, tmp_path):
    """Evaluate again into the same folder and compare with the evaluation it replaces: read before it is removed.
    A comparison refused at the feature net (known once the net is loaded) removed that evaluation first."""
    model, out, result = first
    again = tmp_path / "again"
    shutil.copytree(out, again)
    with pytest.raises(E.EvaluationError, match="another feature net"):
        E.evaluate_model(model, out=again, pipe=_StubPipe(), compare_with=again, **{**SETTINGS, "feature_net_seed": 1})
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in out.iterdir())  # no marker either
    c = E.evaluate_model(model, out=again, pipe=_DarkPipe(), compare_with=again, **SETTINGS)["comparison"]
    assert c["fd"] == pytest.approx(result["realism"]["generated"]["fd"]) and c["with"] == str(again)
    assert C.read_baseline(again)["generated"].mean() != pytest.approx(C.read_baseline(out)["generated"].mean())


def test_folders_without_an_evaluation_or_its_features_are_named(first, tmp_path):
    model, out, _ = first
    with pytest.raises(E.EvaluationError, match=rf"--compare-with {tmp_path}: no evaluation's metrics.json there"):
        E.evaluate_model(model, out=tmp_path / "x", pipe=_StubPipe(), compare_with=tmp_path, **SETTINGS)
    older = tmp_path / "older"
    older.mkdir()
    (older / "metrics.json").write_text((out / "metrics.json").read_text())  # an evaluation from before the file
    with pytest.raises(E.EvaluationError, match="has no features.safetensors .* evaluate that model again"):
        E.evaluate_model(model, out=tmp_path / "x", pipe=_StubPipe(), compare_with=older, **SETTINGS)
    (older / C.FEATURES_FILE).write_bytes(b"not safetensors")
    with pytest.raises(E.EvaluationError, match="cannot be read"):
        E.evaluate_model(model, out=tmp_path / "x", pipe=_StubPipe(), compare_with=older, **SETTINGS)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_the_cli_passes_compare_with_and_refuses_an_empty_one(monkeypatch, tmp_path):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(E, "evaluate_model", fake)
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--model", str(tmp_path), "--compare-with", "other/evaluation"])
    assert seen["compare_with"] == "other/evaluation"
    assert cli.main(["evaluate", "--model", str(tmp_path), "--compare-with", ""]) == 2


def test_the_report_paragraph_names_both_evaluations_and_the_range():
    comparison = {"with": "a/evaluation", "model": "a", "sampling": {"scheduler": "ddpm", "steps": 1000,
                                                                     "guidance": 2.0, "refine_steps": 0,
                                                                     "refine_repeats": 0},
                  "fd": 10.0, "this_fd": 8.0, "fd_gain": 0.2, "fd_gain_interval": [0.05, 0.3], "level": 0.95,
                  "resamples": 200, "verdict": "lower FD than the other's"}
    text = "\n".join(C.report_lines(comparison))
    assert "`a/evaluation`" in text and "+20.0% (+5.0% to +30.0%, a 95% range over 200" in text
    assert "`ddpm` with 1000 steps, guidance 2.0, no refinement" in text
    assert C.report_lines(None) == []
    # a class of one held-out patient: the paired range lacks that patient's chance too, and says so
    res = {"realism": {"fd_intervals": {"groups_of_one_patient": [0]}, "images_per_class": {"AD": 4, "NC": 4}}}
    said = "\n".join(C.report_lines(comparison, res))
    assert "The held-out images of AD are of one patient" in said and "only the generated images vary" in said
    res["realism"]["fd_intervals"]["groups_of_one_patient"] = []
    assert "one patient" not in "\n".join(C.report_lines(comparison, res))
