"""`adni-diffusers evaluate` (adni_diffusers.evaluate) on the tiny preset: every measure's plumbing, the
floors beside the numbers, the feature-net cache, the ablation table, and properties that must hold.
CPU, tiny N (4 images per class), one-epoch nets; the pictures are noise and the numbers meaningless."""

import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import another_process_holding, toy_slices

from adni_diffusers import cli
from adni_diffusers import evaluate as E
from adni_diffusers import features as Fe
from adni_diffusers.generate import model_fingerprint
from adni_diffusers.metrics import FD_NAME, KID_NAME
from adni_diffusers.model_card import render_model_card

QUICK_STEPS = {"ddpm": 6, "ddim": 3, "dpm++": 3, "unipc": 2}  # sampler step counts for the ablation rows
FLOOR = E.FLOOR_LABEL
FEW_RESAMPLES = 10  # the FD bootstrap's default 200 took ~7 s of each tiny evaluation; the tests need it to run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads on a shared, busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_copy(tiny_ldm, tmp_path_factory) -> Path:
    """A private copy of the tiny pipeline: evaluation writes into <model>/evaluation and re-renders its card."""
    folder = tmp_path_factory.mktemp("eval") / "ldm"
    shutil.copytree(tiny_ldm, folder)
    return folder


@pytest.fixture(scope="module")
def evaluated(model_copy):
    """One full evaluation through the Python API, default output folder, ablations on (few steps)."""
    result = E.evaluate_model(model_copy, num_samples=4, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                              diversity_pairs=4, kid_subsets=5, ablations=True, ablation_samples=2,
                              ablation_step_overrides=QUICK_STEPS, fd_resamples=FEW_RESAMPLES, progress=False)
    return result, model_copy / "evaluation"


def test_report_links_pictures_of_classes_whose_names_hold_spaces_or_brackets(evaluated, tmp_path):
    """Class folders such as "Early MCI" or "Alzheimer's (AD)" gave samples_Early MCI.png, linked as
    ![samples Early MCI](samples_Early MCI.png): CommonMark (GitHub, the Hub) takes no space in a link target and
    showed the line as text, no picture."""
    import copy

    result, _ = evaluated
    res = copy.deepcopy(result)
    res["files"]["samples"] = {"Early MCI": "samples_Early MCI.png", "Alzheimer's (AD)": "samples_Alzheimer's (AD).png"}
    report = E.write_report(res, tmp_path).read_text()
    assert "![samples Early MCI](samples_Early%20MCI.png)" in report
    assert "![samples Alzheimer's (AD)](samples_Alzheimer%27s%20%28AD%29.png)" in report
    for target in re.findall(r"!\[[^\]]*\]\(([^)]*)\)", report):
        assert " " not in target and "(" not in target, target


def test_writes_metrics_report_and_pictures(evaluated, model_copy):
    result, out = evaluated
    for name in ("metrics.json", "report.md", "ablations.csv", "samples_AD.png", "samples_NC.png", "umap.png",
                 "closest_pairs.png", "nn_distances.png", "ablations.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["files"]["umap"] == "umap.png"
    report = (out / "report.md").read_text()
    for picture in ("umap.png", "closest_pairs.png", "nn_distances.png", "samples_AD.png", "ablations.png"):
        assert f"]({picture})" in report
    assert FD_NAME in report and "FID" not in report.replace("FID values", "")
    # the feature net lives beside the output folder and was trained on the real training split only, less the
    # patients the floor draws from
    fn = metrics["feature_net"]
    assert Path(fn["path"]).parent == model_copy / "feature_net"
    floor_patients = fn["floor_patients"]
    assert floor_patients["set_aside"] and floor_patients["patients"] >= 2  # one per class at least
    assert fn["trained_on"]["images"] + floor_patients["images"] == metrics["data"]["train"]["images"]
    assert fn["trained_on"]["patients"] + floor_patients["patients"] == metrics["data"]["train"]["patients"]
    assert f"come from {floor_patients['patients']} training patients ({floor_patients['images']} slices), a seeded " \
           "half of each class's, kept out of the feature net's training" in report
    assert 0 <= fn["val"]["accuracy"] <= 1 and "patient_accuracy" in fn["val"]
    # the model card now shows the numbers
    assert "re-rendered" in result["card"] and "not" not in result["card"]
    card = (model_copy / "README.md").read_text()
    assert FD_NAME in card and "evaluation/metrics.json" in card


def test_fd_has_a_patient_bootstrap_interval_in_metrics_report_and_card(evaluated, model_copy):
    """A reviewer's first question: how much would FD move with other held-out patients? metrics.json, report.md and
    the card give FD and its floor a 95% range over resampled held-out patients, and name the feature net's weights
    (FD moves with the net) so that two evaluations can be checked to share one."""
    result, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    iv = metrics["realism"]["fd_intervals"]
    patients = metrics["data"]["validation"]["patients"]
    assert iv["resamples"] == FEW_RESAMPLES and iv["held_out_patients"] == patients and iv["level"] == 0.95
    label = "95% interval over held-out patients"  # the same name in every model's metrics.json
    low, high = metrics[f"{FD_NAME}, {label}"]
    assert [low, high] == iv["fd"] and 0 <= low <= metrics[FD_NAME] <= high  # about the measured FD
    # one held-out patient per class and a floor pool of the images it draws: every resample is the same floor,
    # whose range of width 0 read as certainty
    assert iv["floor_fd"] is None and iv["floor_fd_unvaried"] is True
    assert f"{FD_NAME}, {FLOOR}, {label}" not in metrics
    assert metrics["held-out patients (the real reference)"] == patients
    report = (out / "report.md").read_text()
    assert "The floor's FD has no range: every resample drew the same held-out and training images" in report
    # the memorisation share's threshold is set by few patients: its range, in the record, report and card
    mem = metrics["memorisation"]
    share_name = "memorisation: share of samples nearer to training than held-out p5"
    for space in ("features", "pixels"):
        mem_low, mem_high = mem["intervals"][space]
        assert 0 <= mem_low <= mem[space]["closer_than_heldout_percentile"] <= mem_high <= 1
    assert metrics[f"{share_name}, {label}"] == mem["intervals"]["features"]
    share = mem["features"]["closer_than_heldout_percentile"]
    assert (f"| {E._pct(share)} ({E._pct(mem['intervals']['features'][0])} to "
            f"{E._pct(mem['intervals']['features'][1])}) |") in report
    assert "The memorisation shares' ranges are 95% bootstrap intervals" in report
    low, high = iv["fd"]
    assert f"| {FD_NAME} | {E._f(metrics[FD_NAME])} ({E._f(low)} to {E._f(high)}) |" in report
    assert f"bootstrap intervals over {FEW_RESAMPLES} resamples of the {patients} held-out patients" in report
    # the tiny set holds one patient of each class out: the ranges say what they lack
    assert iv["groups_of_one_patient"] == [0, 1]
    assert ("The held-out images of AD and NC are of one patient each: the ranges hold no "
            "patient-to-patient chance") in report
    # so does the memorisation share's, whose threshold that one patient sets alone (its range had read as over
    # resampled held-out patients, without a word)
    assert mem["intervals"]["groups_of_one_patient"] == [0, 1]
    assert (f"**{E.one_patient_text(mem['intervals'], ['AD', 'NC'], E.MEMORISATION_VARIES)}**" in report
            and "its slices set the threshold alone, and only the generated images vary" in report)
    # the per-class precision/recall radii stay within that patient, unlike the pooled ones: said
    assert metrics["realism"]["generated"]["reference_patients"] == 2
    assert all(v[kind]["reference_patients"] == 1 for v in metrics["realism"]["per_class"].values()
               for kind in ("generated", "floor", "vq_ceiling"))
    assert ("The held-out images of AD and NC are of one patient: there, a real slice's precision/recall radius is "
            "to the k-th nearest slice of that same patient") in report
    # no class has real diversity pairs: the generated mean is not said to leave any class out
    assert "No real pairs for AD, NC" in report and "out on both sides" not in report
    assert "The generated mean in the summary has no real mean to compare with." in report
    assert metrics["environment"]["torch"] == torch.__version__ and metrics["environment"]["device"].startswith("cpu")
    digest = metrics["feature_net"]["weights_sha256"]
    assert digest == Fe.weights_digest(Fe.load_feature_net(metrics["feature_net"]["path"]))
    assert f"sha256 `{digest[:16]}` of its weights, trained with seed 0" in report
    card = (model_copy / "README.md").read_text()
    assert f"| `{FD_NAME}, {label}` | {low:.4g} to {high:.4g} |" in card
    # the card's readers get the one-patient caveat too (the report's alone said it)
    assert ("The held-out images of AD and NC are of one patient each: the interval rows hold no patient-to-patient "
            "chance there, so they are narrower than the truth") in card
    # the ablations' refinement advice: its gain's paired interval, in the record and the report
    gain_low, gain_high = metrics["ablations"]["recommendation"]["refinement"]["gain_interval"]
    assert gain_low <= gain_high and f"{E._signed_pct(gain_low)} to {E._signed_pct(gain_high)}" in report


def test_feature_nets_measure_the_main_comparisons_in_nets_of_other_seeds(model_copy, tmp_path):
    """One net's FD is one draw of a yardstick (the demo model's FD was 29.7 in the seed-0 net, 9.2 in the seed-1
    net). --feature-nets N measures generated, floor and ceiling in N nets and reports each and their range; the
    first net's numbers are the main ones."""
    out = tmp_path / "two_nets"
    result = E.evaluate_model(model_copy, num_samples=4, steps=2, seed=0, feature_epochs=1, tstr_epochs=1,
                              diversity_pairs=4, kid_subsets=5, umap=False, out=out, render_card=False,
                              progress=False, feature_cache=tmp_path / "nets", feature_nets=2, fd_resamples=0)
    nets = result["realism"]["across_feature_nets"]
    assert nets["seeds"] == [0, 1] and result["settings"]["feature_nets"] == 2
    assert nets["weights_sha256"][0] == result["feature_net"]["weights_sha256"] != nets["weights_sha256"][1]
    assert len(list((tmp_path / "nets").glob("feature-net-*"))) == 2  # each trained once, cached
    for kind in ("generated", "floor", "vq_ceiling"):
        assert nets[kind]["fd"][0] == result["realism"][kind]["fd"] and len(nets[kind]["recall"]) == 2
    assert nets["generated"]["fd"][1] != nets["generated"]["fd"][0]
    fd_range = result[f"{FD_NAME}, range over --feature-nets"]
    assert fd_range == [min(nets["generated"]["fd"]), max(nets["generated"]["fd"])]
    assert result[f"{FD_NAME}, {FLOOR}, range over --feature-nets"] == sorted(nets["floor"]["fd"])
    report = (out / "report.md").read_text()
    assert "### In 2 feature nets" in report and f"| 1 | `{nets['weights_sha256'][1][:16]}` |" in report
    assert "trained with seed 0): compare FD only between evaluations with the same net." in report
    assert f"{FD_NAME}, 95% interval" not in json.dumps(result)  # --fd-resamples 0: none


def test_fd_intervals_resample_patients_not_slices():
    """Slices of one patient are alike: resampling them as if independent gave a range far too narrow. With each
    held-out patient's slices near copies of each other, the patient bootstrap's range is over twice the one
    that counts every slice as a patient of its own; the same seed gives the same range; 0 resamples, none."""
    g = torch.Generator().manual_seed(0)
    patients = [f"p{i}" for i in range(8) for _ in range(10)]
    centres = torch.randn(8, 6, generator=g) * 2
    held = centres.repeat_interleave(10, 0) + 0.05 * torch.randn(80, 6, generator=g)
    gen, train = torch.randn(80, 6, generator=g), torch.randn(200, 6, generator=g)
    zeros = torch.zeros

    def intervals(names, resamples=100, seed=0):
        return E.fd_intervals(held_feats=held, held_groups=zeros(80, dtype=torch.long), held_patients=names,
                              gen_feats=gen, gen_groups=zeros(80, dtype=torch.long), train_feats=train,
                              train_groups=zeros(200, dtype=torch.long), counts={0: 80}, seed=seed,
                              measured=(E.M.frechet_distance(held, gen), 1.0), resamples=resamples)

    by_patient = intervals(patients)
    by_slice = intervals([f"s{i}" for i in range(80)])
    assert by_patient["held_out_patients"] == 8 and by_slice["held_out_patients"] == 80
    width = {name: iv["fd"][1] - iv["fd"][0] for name, iv in (("patient", by_patient), ("slice", by_slice))}
    assert width["patient"] > 2 * width["slice"], width
    assert intervals(patients) == by_patient and intervals(patients, seed=1) != by_patient
    assert intervals(patients, resamples=0) == {}


def test_the_card_shows_an_interval_as_a_range_and_skips_other_lists():
    from adni_diffusers.model_card import _numeric_rows

    rows = _numeric_rows({"FD": 29.671, "FD, 95% interval": [19.61, 39.14], "class_names": ["AD", "NC"],
                          "three": [1, 2, 3], "flag": True})
    assert rows == [("FD", "29.67"), ("FD, 95% interval", "19.61 to 39.14")]


def test_held_out_is_the_training_split_and_floors_stand_beside_numbers(evaluated, model_copy):
    result, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    recorded = json.loads((model_copy / "training_data.json").read_text())
    assert metrics["data"]["validation"] == recorded["validation"]
    assert metrics["data"]["train"] == recorded["train"]
    # top-level numbers (the model card's table): each distribution metric with its real-vs-real floor
    for name in (FD_NAME, KID_NAME, "precision (adni-features, k=3)", "recall (adni-features, k=3)"):
        assert isinstance(metrics[name], float)
        assert isinstance(metrics[f"{name}, {FLOOR}"], float)
    assert metrics["MS-SSIM diversity, generated (lower = more diverse)"] <= 1
    for key in ("feature-net accuracy on generated AD", "feature-net accuracy on generated NC",
                "feature-net accuracy on real held-out slices",
                "TSTR accuracy (train on synthetic, test on real held-out)",
                "TRTR accuracy (train on real, test on real held-out)"):
        assert 0 <= metrics[key] <= 1, key
    assert all(not isinstance(v, (dict, list)) for k, v in metrics.items() if isinstance(v, (int, float)))
    # same N on both sides of every comparison
    gen, floor = metrics["realism"]["generated"], metrics["realism"]["floor"]
    assert gen["candidate_images"] == gen["reference_images"] == floor["candidate_images"] == 8
    assert set(metrics["realism"]["per_class"]) == {"AD", "NC"}
    mem = metrics["memorisation"]
    assert len(mem["features"]["generated_distance"]) == 8
    assert len(mem["features"]["heldout_distance"]) == metrics["data"]["validation"]["images"]
    assert 0 <= mem["pixels"]["closer_than_heldout_percentile"] <= 1
    # the floor of that row is measured: below 20 held-out slices it is 1/N, not the nominal 5%
    for space in ("features", "pixels"):
        hd = torch.tensor(mem[space]["heldout_distance"])
        share = float((hd < mem[space]["heldout_percentile_distance"]).double().mean())
        assert mem[space]["heldout_below_percentile"] == pytest.approx(share)
    # the reference went through the same VQ decoder as the samples; the plain held-out numbers stand beside it
    assert mem["reference"] == "held-out real slices after the VQ round trip"
    for space in ("features", "pixels"):
        assert 0 <= mem["heldout_as_is"][space]["closer_than_heldout_percentile"] <= 1
        assert mem["heldout_as_is"][space]["heldout_median"] != mem[space]["heldout_median"]
    report = (out / "report.md").read_text()
    assert "| measure | generated | floor (real) | VQ ceiling |" in report


def test_report_states_held_out_patients_that_training_also_saw(evaluated, tmp_path):
    """`--split given` on a folder whose train/test share patients: the report must not call them unseen."""
    result, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["shared_patients"] == 0
    assert metrics["settings"]["ms_ssim_scale"] == "[0, 1], data_range 1"
    assert "patients the model never saw." in (out / "report.md").read_text()
    res = {k: v for k, v in result.items() if k != "card"}
    res["data"] = {**res["data"], "split": "given", "shared_patients": 3}
    report = E.write_report(res, tmp_path).read_text()
    held = res["data"]["validation"]["patients"]
    assert "never saw" not in report
    assert f"{held} patients, 3 of whom the model also saw in training." in report
    assert "3 patients of the held-out set also have slices in the training split" in report
    assert "--split patient" in report


def test_the_record_and_report_of_an_exported_checkpoint_say_which_step(evaluated, tmp_path):
    """A pipeline `adni-diffusers export` made of checkpoint-N: its evaluation said only the folder's path, so
    evaluations of several steps of one run were told apart by folder names alone."""
    result, out = evaluated
    assert "exported_step" not in json.loads((out / "metrics.json").read_text())["model"]  # the final pipeline
    assert "adni-diffusers export" not in (out / "report.md").read_text()
    exported = tmp_path / "step300"
    exported.mkdir()
    (exported / "exported_from.json").write_text(json.dumps({"checkpoint": "/runs/ldm/checkpoint-300", "step": 300,
                                                             "weights": "EMA", "vqmodel": "/runs/vq"}))
    assert E.exported_step(exported) == {"exported_step": 300, "exported_weights": "EMA"}
    res = {k: v for k, v in result.items() if k != "card"}
    res["model"] = {**res["model"], **E.exported_step(exported)}
    report = E.write_report(res, tmp_path).read_text()
    assert ("The model is step 300 of its training run (`checkpoint-300`, the EMA's weights), saved as a pipeline "
            "by `adni-diffusers export`.") in report


def test_the_record_names_the_weights_it_measured(evaluated, model_copy):
    """metrics.json named the model by its path alone: an evaluation written to another --out could not be told
    from one of the weights a later resume or retraining saved there (generation.json records this digest)."""
    from adni_diffusers.generate import model_fingerprint

    recorded = json.loads((evaluated[1] / "metrics.json").read_text())
    assert recorded["model"]["model_sha256"] == model_fingerprint(str(model_copy))
    assert len(recorded["model"]["model_sha256"]) == 64
    # and the seed of each sample, in words: the grids alone could not be remade image by image
    from adni_diffusers.evaluate import IMAGE_SEED_RULE, image_seed

    assert recorded["settings"]["image_seed"] == IMAGE_SEED_RULE
    assert image_seed(3, 1, 5) == 3 * 1000003 + (1 + 1) * 100003 + 5 and "* 100003 + sample index" in IMAGE_SEED_RULE


def test_the_report_says_what_another_evaluation_must_share_to_be_compared(evaluated):
    """A model trained with another --seed was measured against other held-out patients in another net, and nothing
    said so: the report names the net's and the held-out patients' digests another evaluation must share."""
    record = json.loads((evaluated[1] / "metrics.json").read_text())
    report = (evaluated[1] / "report.md").read_text()
    net, held_out = record["feature_net"]["weights_sha256"], record["data"]["validation"]["patients_sha256"]
    assert (f"the same feature net (weights `{net[:12]}`), the same held-out patients (`{held_out[:12]}`" in
            " ".join(report.split())), report[:3000]


def test_vq_ceiling_is_the_floors_images_through_the_autoencoder(evaluated, model_copy):
    """The ceiling compares the floor's own training images, after VQ encode + decode, with the same held-out set."""
    result, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    floor, ceiling = metrics["realism"]["floor"], metrics["realism"]["vq_ceiling"]
    assert ceiling["candidate_images"] == floor["candidate_images"] == 8
    assert ceiling["reference_images"] == floor["reference_images"]
    # a 4-step tiny VQModel blurs everything: its round trips are further from real slices than real slices are
    assert ceiling["fd"] > floor["fd"]
    assert metrics[f"{FD_NAME}, {E.CEILING_LABEL}"] == ceiling["fd"]
    assert set(metrics["realism"]["per_class"]["AD"]) == {"generated", "floor", "vq_ceiling"}
    acc = metrics["class_fidelity"]["vq_ceiling"]["per_class"]
    assert set(acc) == {"AD", "NC"} and all(0 <= v <= 1 for v in acc.values())
    # the round trip is the pipeline's own encode + decode of uint8 slices
    from adni_diffusers import ADNILatentDiffusionPipeline

    pipe = ADNILatentDiffusionPipeline.from_pretrained(model_copy)
    pixels = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trip = E.vq_round_trip(pipe, pixels, batch_size=2)
    assert trip.shape == (3, 1, 256, 256) and trip.min() >= -1 and trip.max() <= 1
    expected = pipe(image=pixels.numpy(), strength=0.0, output_type="pt").images * 2 - 1  # one batch of 3
    torch.testing.assert_close(trip, expected, atol=1e-4, rtol=0)


def test_ablation_table_has_the_named_rows(evaluated):
    result, out = evaluated
    rows = result["ablations"]["rows"]
    settings = {(r["group"], r["setting"]) for r in rows}
    assert settings == {("refinement", "off"), ("refinement", "original 30x5"), ("refinement", "milder 10x2"),
                        ("sampler", "ddpm-1000"), ("sampler", "ddim-50"), ("sampler", "dpm++-25"),
                        ("sampler", "unipc-10"), ("guidance", "w=1"), ("guidance", "w=2"), ("guidance", "w=3"),
                        ("guidance", "w=5")}
    for r in rows:
        assert r["fd"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["seconds"] > 0
        assert 0 <= r["class_accuracy"] <= 1
    by = {(r["group"], r["setting"]): r for r in rows}
    assert by[("refinement", "original 30x5")]["refine_repeats"] == 5
    assert by[("refinement", "original 30x5")]["refine_steps"] >= 1
    assert by[("refinement", "off")]["refine_repeats"] == 0
    # the main setting (dpm++, guidance 2, no refinement) is run once and shared between groups
    assert by[("sampler", "dpm++-25")]["same_run_as"] == by[("refinement", "off")]["label"]
    assert by[("guidance", "w=2")]["fd"] == by[("refinement", "off")]["fd"]
    assert result["ablations"]["recommendation"]["refinement"]["setting"] in {"off", "original 30x5", "milder 10x2"}
    report = (out / "report.md").read_text()
    assert "## Ablations" in report and f"**{FLOOR}**" in report
    csv_rows = (out / "ablations.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(rows) + 1  # header, rows, floor


def test_every_ablation_row_gets_a_paired_interval_of_its_fd_gain_over_the_main_setting(evaluated):
    """Is guidance 5's lower FD more than the held-out patients and the seeds explain? Each row's relative FD gain
    over the main setting (the main run's sampler, steps and guidance) comes with its paired bootstrap interval,
    in metrics.json, the report's table and ablations.csv."""
    result, out = evaluated
    ab = result["ablations"]
    rows = {r["label"]: r for r in ab["rows"]}
    main = rows[ab["main_setting"]]
    assert (main["scheduler"], main["guidance"], main["refine_repeats"]) == ("dpm++", 2.0, 0)
    report = (out / "report.md").read_text()
    assert "FD gain vs the main setting (95% paired interval)" in report
    for r in rows.values():
        assert r["fd_gain_vs_main"] == pytest.approx((main["fd"] - r["fd"]) / main["fd"])
        if (r["same_run_as"] or r["label"]) == main["label"]:  # the main setting itself (and its other names)
            assert r["fd_gain_vs_main"] == 0 and r["fd_gain_vs_main_interval"] is None
            continue
        low, high = r["fd_gain_vs_main_interval"]
        assert low <= r["fd_gain_vs_main"] <= high  # centred on the measured gain
        assert f"| {E._signed_pct(r['fd_gain_vs_main'])} ({E._signed_pct(low)} to {E._signed_pct(high)}) |" in report
    # the rows that are the main run under another name: no interval against themselves
    w2 = next(r for r in rows.values() if r["group"] == "guidance" and r["setting"] == "w=2")
    assert w2["same_run_as"] == main["label"] and w2["fd_gain_vs_main_interval"] is None


def test_default_ablation_plan():
    rows = E.ablation_plan(conditional=True, scheduler="dpm++", steps=25, guidance=2.0)
    samplers = {(r["scheduler"], r["steps"]) for r in rows if r["group"] == "sampler"}
    assert samplers == {("ddpm", 1000), ("ddim", 50), ("dpm++", 25), ("unipc", 10)}
    assert [r["refine"] for r in rows if r["group"] == "refinement"] == [None, (30, 5), (10, 2)]
    assert [r["guidance"] for r in rows if r["group"] == "guidance"] == [1.0, 2.0, 3.0, 5.0]
    assert not [r for r in E.ablation_plan(False, "dpm++", 25, 1.0) if r["group"] == "guidance"]


def test_refinement_in_the_seeds_units(model_copy):
    config = json.loads((model_copy / "scheduler" / "scheduler_config.json").read_text())
    assert E.refinement_steps(config, "ddpm", 1000, 30) == (30, 29)  # exactly the seed's last 30 of 1000
    n, t = E.refinement_steps(config, "ddim", 50, 30)
    assert n == 1 and t == 19  # DDIM-50 timesteps 999, 979, ..., 39, 19 ("trailing")
    n, t = E.refinement_steps(config, "dpm++", 25, 30)
    assert n == 1 and t > 0  # no DPM++-25 timestep below 30: its last one


def test_cli_reuses_the_feature_net_and_writes_elsewhere(evaluated, model_copy, tmp_path, capsys):
    """Another --out still finds the net beside the model (where `counterfactual` looks too); another --seed draws
    other samples but measures them with the same net (every --seed trained a net of its own before)."""
    result, _ = evaluated
    out = tmp_path / "second"
    rc = cli.main(["evaluate", "--model", str(model_copy), "--out", str(out), "--num-samples", "2", "--steps", "2",
                   "--feature-epochs", "1", "--tstr-epochs", "1", "--diversity-pairs", "2", "--kid-subsets", "3",
                   "--no-umap", "--device", "cpu", "--seed", "1", "--fd-resamples", str(FEW_RESAMPLES)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reused from cache" in printed and FD_NAME in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_net"]["cached"] is True
    assert metrics["feature_net"]["path"] == result["feature_net"]["path"]
    assert not (tmp_path / "feature_net").exists()
    assert "reused from the cache" in (out / "report.md").read_text()
    assert not (out / "umap.png").exists() and (out / "samples_NC.png").is_file()


def test_class_name_mismatch_is_refused(model_copy, demo_root, tmp_path, capsys):
    other = tmp_path / "AD_MCI"
    shutil.copytree(demo_root, other)
    for split in ("train", "test"):
        if (other / split / "NC").is_dir():
            (other / split / "NC").rename(other / split / "MCI")
    rc = cli.main(["evaluate", "--model", str(model_copy), "--data-dir", str(other), "--num-samples", "2",
                   "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "class" in err and "MCI" in err and "['AD', 'NC']" in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_properties_through_the_evaluation_functions(evaluated, model_copy):
    """FD of a set with itself is ~0 (precision = recall = 1); a shifted set is farther; MS-SSIM diversity of
    identical images is 1; real pairs never pair two slices of one patient."""
    from adni_diffusers.features import load_feature_net

    result, _ = evaluated
    net = load_feature_net(result["feature_net"]["path"])
    data, _ = E.load_evaluation_data(model_copy)
    real = data.train.pixels
    feats = E.extract_features(net, real, batch_size=16, progress=False)
    same = E.compare_features(feats, feats.clone(), kid_subsets=5)
    assert same["fd"] < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = torch.roll(real, shifts=24, dims=-1)  # the same brains, moved sideways
    moved = E.compare_features(feats, E.extract_features(net, shifted, batch_size=16, progress=False), kid_subsets=5)
    assert moved["fd"] > 100 * max(same["fd"], 1e-6) and moved["fd"] > 1e-3
    brighter = (real.float() * 1.5).clamp(0, 255).to(torch.uint8)
    assert E.compare_features(feats, E.extract_features(net, brighter, progress=False), kid_subsets=5)["fd"] > 1e-3

    one = real[:1].repeat(4, 1, 1)
    div = E.diversity(one, torch.zeros(4, dtype=torch.long), ["AD"], num_pairs=6)
    assert div["mean"] == pytest.approx(1.0, abs=1e-4) and div["per_class"]["AD"]["pairs"] == 6
    assert E.diversity(real[:4], None, [], num_pairs=6)["mean"] < 1.0

    pairs = E.random_pairs(6, 100, seed=0, groups=["a", "a", "b", "b", "c", "c"])
    assert len(pairs) == 12 and all(p[0] // 2 != p[1] // 2 for p in pairs.tolist())


def test_samples_depend_on_seed_class_and_index_only(model_copy):
    """Same seeds in every ablation row: a sample does not depend on the batch it was drawn in."""
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline

    pipe = ADNILatentDiffusionPipeline.from_pretrained(model_copy)
    kw = dict(scheduler="ddpm", steps=3, guidance=2.0, seed=5, progress=False)
    together = E.sample_images(pipe, [0, 0, 1], batch_size=3, **kw)
    alone = E.sample_images(pipe, [0, 0, 1], batch_size=1, **kw)
    first = E.sample_images(pipe, [0], batch_size=1, **kw)
    # This 4-step model's x0 prediction at t = 999 is far off (latents in the hundreds), so the float rounding
    # that differs between batch sizes moves a few latents onto other codes: compare the mean, not each pixel.
    # Batch-dependent noise would make them as different as two samples are (0.33 here).
    assert (together - alone).abs().mean() < 0.01 and (first[0] - together[0]).abs().mean() < 0.01
    assert (together[0] - together[1]).abs().mean() > 0.1
    assert not torch.allclose(together[0], together[1])
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"  # restored after sampling
    s = E.as_slice_set(together, [0, 0, 1], ["AD", "NC"])
    assert s.pixels.dtype == torch.uint8 and s.labels.tolist() == [0, 0, 1] and len(set(s.patients)) == 3
    from adni_diffusers.features import slice_positions

    assert torch.isnan(slice_positions(s)).all()  # no slice-position target for generated images


def test_unconditional_model(tiny_ldm, demo_root, evaluated, tmp_path):
    """An unconditional model (no class labels): N in all, no guidance rows, class shares instead of
    class fidelity; without training_data.json the data folder must be given."""
    from diffusers import UNet2DModel

    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline
    from adni_diffusers.presets import unet_config

    p = ADNILatentDiffusionPipeline.from_pretrained(tiny_ldm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(**unet_config("tiny"))
    folder = tmp_path / "uncond"
    ADNILatentDiffusionPipeline(p.vqvae, unet, p.scheduler).save_pretrained(folder)
    with pytest.raises(E.EvaluationError, match="--data-dir"):
        E.evaluate_model(folder, num_samples=4, progress=False)
    with pytest.raises(E.EvaluationError, match="--guidance 3: this model is unconditional"):  # was dropped silently
        E.evaluate_model(folder, demo_root, num_samples=4, guidance=3.0, progress=False)
    result = E.evaluate_model(folder, demo_root, num_samples=6, steps=2, feature_epochs=1, tstr_epochs=1,
                              diversity_pairs=3, kid_subsets=3, ablations=True, ablation_samples=4,
                              ablation_step_overrides=QUICK_STEPS, feature_cache=evaluated[1].parent / "feature_net",
                              fd_resamples=FEW_RESAMPLES, progress=False)
    out = folder / "evaluation"
    assert result["feature_net"]["cached"] is True  # same data, same settings as the conditional run
    assert result["class_fidelity"] is None and set(result["class_shares"]["generated"]) == {"AD", "NC"}
    assert result["realism"]["generated"]["candidate_images"] == 6 and (out / "samples_samples.png").is_file()
    assert {r["group"] for r in result["ablations"]["rows"]} == {"refinement", "sampler"}
    report = (out / "report.md").read_text()
    assert (out / "umap.png").is_file() and "## Class balance" in report
    assert "MS-SSIM of random pairs (all images" in report and "within a class" not in report  # no classes here
    assert FD_NAME in json.loads((out / "metrics.json").read_text())


def test_vq_held_out_metrics_use_a_seeded_subset_with_each_class_in_its_share():
    """The VQ metrics' `--eval_max_images` subset: not the first N files (path order puts all AD before NC)."""
    from adni_diffusers.data import SliceSet
    from adni_diffusers.vq_eval import _loader, stratified_rows

    labels = torch.tensor([0] * 60 + [1] * 40)  # AD first, as the files sort
    rows = stratified_rows(labels, 20, seed=0)
    assert len(rows) == len(set(rows.tolist())) == 20 and torch.equal(rows, rows.sort().values)
    assert (labels[rows] == 0).sum() == 12 and (labels[rows] == 1).sum() == 8  # 60% / 40%, as in the set
    assert torch.equal(rows, stratified_rows(labels, 20, seed=0))
    assert not torch.equal(rows, stratified_rows(labels, 20, seed=1))
    odd = stratified_rows(torch.tensor([0] * 5 + [1] * 3 + [2] * 2), 5, seed=0)  # rounding: still 5 rows
    assert len(odd) == 5
    slices = SliceSet(torch.zeros(100, 8, 8, dtype=torch.uint8), labels, [str(i) for i in range(100)],
                      [f"{i}.jpeg" for i in range(100)], ["AD", "NC"])
    seen = torch.cat([b["class_labels"] for b in _loader(slices, batch_size=7, limit=20)])
    assert seen.tolist().count(0) == 12 and seen.tolist().count(1) == 8
    assert len(list(_loader(slices, batch_size=50, limit=None))) == 2  # no limit: every image


def test_split_is_redrawn_with_the_split_seed(tmp_path):
    """A UNet trained with --seed 5 --split_seed 0 held out the patients of seed 0: evaluate redraws those."""
    from adni_diffusers.evaluate import read_training_record

    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "split": "patient"}))
    (tmp_path / "training_args.json").write_text(json.dumps({"seed": 5, "split_seed": 0, "val_fraction": 0.2}))
    assert read_training_record(tmp_path)["seed"] == 0
    (tmp_path / "training_args.json").write_text(json.dumps({"seed": 5, "split_seed": None, "val_fraction": 0.2}))
    assert read_training_record(tmp_path)["seed"] == 5


def test_a_model_from_before_the_subject_rule_is_split_as_it_was_trained(tmp_path):
    """Records from before 2026-12-03 do not say how patients were named: those runs took the file name's patient
    part as it is (--patient_ids file), so evaluate redraws that split, not one by ADNI subject."""
    from adni_diffusers.evaluate import read_training_record

    assert read_training_record(tmp_path)["patient_ids"] == "subject"  # no records at all: today's rule
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "split": "patient"}))
    assert read_training_record(tmp_path)["patient_ids"] == "file"
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "split": "patient",
                                                             "patient_ids": "subject"}))
    # the subject rule before 2026-12-04 (a subject named both ways, 002_S_0295 and sub-ADNI002S0295, was two)
    assert read_training_record(tmp_path)["patient_ids"] == "subject-2026-12-03"
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "split": "patient",
                                                             "patient_ids": "subject", "subjects_named_both_ways": 0}))
    assert read_training_record(tmp_path)["patient_ids"] == "subject"


@pytest.mark.parametrize("flag, value", [("--feature-epochs", "0"), ("--num-samples", "0"), ("--kid-subsets", "-1"),
                                         ("--tstr-epochs", "0"), ("--refine-repeats", "-2")])
def test_count_flags_are_refused_when_parsed(flag, value, capsys):
    """Before: --feature-epochs 0 measured with an untrained (and then cached) feature net, silently."""
    import argparse

    from adni_diffusers.evaluate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", flag, value])
    assert flag in capsys.readouterr().err


def test_diversity_means_cover_the_same_classes():
    """A class without real pairs (one held-out patient) was in the generated mean alone."""
    generated = {"mean": 0.652, "per_class": {"AD": {"mean": 0.304}, "NC": {"mean": 1.0}}}
    real = {"mean": 0.304, "per_class": {"AD": {"mean": 0.304}}}
    E.same_classes(generated, real)
    assert generated["mean"] == real["mean"] == pytest.approx(0.304) and generated["classes"] == ["AD"]
    lone = {"mean": 0.5, "per_class": {"AD": {"mean": 0.5}}}
    E.same_classes(lone, {"mean": math.nan, "per_class": {}})  # nothing to compare with: left as it is
    assert lone["mean"] == 0.5


def test_feature_net_refuses_zero_epochs(demo_root):
    from adni_diffusers.data import load_slices
    from adni_diffusers.features import train_feature_net

    train = load_slices(demo_root).train
    with pytest.raises(ValueError, match="epochs >= 1"):
        train_feature_net(train, epochs=0)


@pytest.mark.parametrize("kw, match", [
    (dict(steps=3, refine_steps=0, refine_repeats=2), "--refine-steps between 1 and --steps"),
    (dict(steps=3, refine_steps=4, refine_repeats=1), "--refine-steps between 1 and --steps"),
    (dict(steps=3, refine_steps=2, refine_repeats=0), "needs --refine-repeats"),
    (dict(scheduler="ddpm", steps=1001), "--steps 1001"),
    (dict(guidance=float("nan")), "--guidance nan: expected a finite number"),
    # UMAP's limit: a seed past it failed after all the sampling (or, past 2**64 / 1000003, at the first sample
    # once the earlier evaluation was removed), naming no flag
    (dict(seed=-1), r"--seed -1: expected 0 .. 2\*\*32 - 1"),
    (dict(seed=2**32), "--seed 4294967296: expected"),
    # torch keeps a seed's low 32 bits: 0, 2**32 and 2**63 trained one net, cached as three "yardsticks"
    (dict(feature_net_seed=2**32), r"--feature-net-seed 4294967296: expected 0 .. 2\*\*32 - 1"),
    (dict(feature_net_seed=-1), r"--feature-net-seed -1: expected"),
    (dict(feature_net_seed=2**32 - 2, feature_nets=3), r"2\*\*32 - 3 \(with --feature-nets 3, the seeds up to it \+ 2\)"),
    (dict(ablations=True, ablation_samples=1), "--ablation-samples 1: expected at least 2"),
    # below 0 it steered away from the class, without a word (counterfactual refused it)
    (dict(guidance=-1.0), "--guidance -1: expected a number >= 0"),
    # 0 is the unconditional model: every class's samples the same model's, scored as that class's
    (dict(guidance=0.0), "--guidance 0 samples the unconditional model, so the class labels would have no effect"),
    # "" (an unset shell variable) wrote the evaluation into the current folder (and the summary named another)
    (dict(out=""), "--out is empty; expected an output folder"),
])
def test_bad_sampling_settings_are_refused_before_any_work(model_copy, tmp_path, monkeypatch, kw, match):
    """Before: these failed in the pipeline (or were ignored) only after the feature net was trained."""
    import adni_diffusers.features as features

    def no_work(*args, **kwargs):
        raise AssertionError("the feature net was trained before the sampling settings were checked")

    monkeypatch.setattr(features, "get_or_train_feature_net", no_work)
    with pytest.raises(E.EvaluationError, match=match):
        E.evaluate_model(model_copy, num_samples=2, device="cpu", progress=False, render_card=False,
                         **{"out": tmp_path / "out", **kw})


def test_ablation_samples_without_ablations_are_refused(tmp_path, capsys):
    """--ablation-samples without --ablations did nothing, without a word."""
    from adni_diffusers import cli

    assert cli.main(["evaluate", "--model", str(tmp_path), "--ablation-samples", "8"]) == 2
    assert "--ablation-samples 8 needs --ablations" in capsys.readouterr().err


def test_ablations_of_a_model_with_fewer_training_timesteps(model_copy, tmp_path):
    """Before: the DDPM-1000 row crashed (more steps than the model's 20 timesteps) after everything else had run,
    and nothing was written."""
    folder = tmp_path / "ldm20"
    shutil.copytree(model_copy, folder, ignore=shutil.ignore_patterns("evaluation", "feature_net"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["num_train_timesteps"] = 20
    config_file.write_text(json.dumps(config))
    index_file = folder / "model_index.json"  # the forward process the pipeline records its UNet learned, too
    index = json.loads(index_file.read_text())
    index["training_noise"]["num_train_timesteps"] = 20
    index_file.write_text(json.dumps(index))
    result = E.evaluate_model(folder, num_samples=2, steps=3, feature_epochs=1, tstr_epochs=1, diversity_pairs=2,
                              kid_subsets=2, ablations=True, ablation_samples=2, umap=False, render_card=False,
                              ablation_step_overrides={k: v for k, v in QUICK_STEPS.items() if k != "ddpm"},
                              fd_resamples=FEW_RESAMPLES, progress=False, device="cpu")
    ddpm = next(r for r in result["ablations"]["rows"] if r["group"] == "sampler" and r["scheduler"] == "ddpm")
    assert ddpm["steps"] == 20 and "(20 steps)" in ddpm["label"]
    assert (folder / "evaluation" / "metrics.json").is_file()


def test_ablation_rows_measure_8_bit_pixels_as_the_main_row_does():
    """The main row and the real slices are measured as 8-bit pixels; the ablation rows took the float samples,
    so the same setting could show a slightly different FD in the two tables."""
    seen = []

    class Net:
        def features(self, x, batch_size=64, device="cpu"):
            seen.append(x.dtype)
            return torch.arange(len(x) * 4, dtype=torch.float32).reshape(len(x), 4) + torch.rand(len(x), 4)

    images = torch.rand(6, 1, 8, 8) * 2 - 1
    row = {"group": "one row", "setting": "main", "scheduler": "dpm++", "steps": 25, "refine": None, "guidance": 1.0}
    result = E.run_ablations(None, [row], Net(), {None: torch.rand(6, 4)}, {None: 6}, {"fd": 1.0}, seed=0,
                             batch_size=6, device="cpu", feature_batch=6, kid_subsets=2, class_names=[],
                             progress=False, reuse={("dpm++", 25, 0, 0, 1.0): (images, 1.0)})
    assert seen == [torch.uint8] and result["rows"][0]["fd"] >= 0



def test_memorisation_share_is_of_the_samples_that_copy_training_images():
    """`closer_than_heldout_percentile` is the share of GENERATED samples nearer to the training set than the held-out
    p5: samples that are training slices score 1, samples far from everything 0 (whatever the held-out share)."""
    g = torch.Generator().manual_seed(0)
    train_f, held_f = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    train_px = torch.randint(0, 256, (40, 64, 64), dtype=torch.uint8, generator=g)
    held_px = torch.randint(0, 256, (30, 64, 64), dtype=torch.uint8, generator=g)
    copies = E.memorisation(train_f[:10].clone(), train_f, held_f, train_px[:10].clone(), train_px, held_px)
    far = E.memorisation(train_f[:10] + 100, train_f, held_f, torch.zeros(10, 64, 64, dtype=torch.uint8), train_px,
                         held_px)
    for space in ("features", "pixels"):
        assert copies[space]["closer_than_heldout_percentile"] == 1.0
        assert far[space]["closer_than_heldout_percentile"] == 0.0
        assert 0 < copies[space]["heldout_below_percentile"] < 1  # the held-out share is another number
    # medians of even counts (30 held-out, 10 generated) are the mean of the two middle values, not torch's lower one
    for space in ("features", "pixels"):
        for which in ("generated", "heldout"):
            distances = far[space][f"{which}_distance"]
            assert far[space][f"{which}_median"] == pytest.approx(float(np.median(distances)), rel=1e-9)


def test_precision_is_fidelity_and_recall_is_coverage():
    """Samples all in one corner of the real manifold: precision (samples inside the real manifold) 1, recall (real
    images inside the samples' manifold) near 0 -- not the other way round."""
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(200, 4, generator=g)
    candidate = reference[:1] + 0.01 * torch.randn(50, 4, generator=g)
    m = E.compare_features(reference, candidate, kid_subsets=2)
    assert m["precision"] == 1.0 and m["recall"] < 0.05


def test_class_fidelity_counts_what_the_net_predicts():
    class Net:
        def predict(self, images, batch_size=64, device=None):
            return torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])

    out = E.class_fidelity(Net(), torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["AD", "NC"])
    assert out["accuracy"] == 0.5 and out["per_class"] == {"AD": 0.5, "NC": 0.5}
    assert out["predicted_as"] == {"AD": {"AD": 1, "NC": 1}, "NC": {"AD": 1, "NC": 1}}


@pytest.fixture(scope="module")
def spied(evaluated, model_copy, tmp_path_factory):
    """A small second evaluation (the feature net of `evaluated` comes from the cache) that records which images go
    into each samples_<class>.png and what the TSTR / TRTR classifiers train and test on."""
    from adni_diffusers import plots

    calls = {"classifier": [], "classifier_names": [], "grids": {}, "samples": None}
    sample, grid = E.sample_images, plots.save_image_grid

    def sample_spy(pipe, labels, **kw):
        images = sample(pipe, labels, **kw)
        if calls["samples"] is None:  # the main run's samples
            calls["samples"] = (torch.tensor(labels), images)
        return images

    def grid_spy(images, path, nrow=None, **kw):
        calls["grids"][Path(path).name] = images.clone()
        calls.setdefault("captions", {})[Path(path).name] = kw.get("caption")
        calls.setdefault("paths", {})[Path(path).name] = Path(path)
        return grid(images, path, nrow, **kw)

    def classifier_spy(train, test, settings, name="classifier"):
        calls["classifier"].append((list(train.paths), list(test.paths)))
        calls["classifier_names"].append(name)
        generated = all(p.startswith("generated/") for p in train.paths)
        return {"accuracy": 0.25 if generated else 0.75, "patient_accuracy": None, "accuracy_per_class": {},
                "train_images": len(train), "test_images": len(test), "train_seconds": 0.0}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "sample_images", sample_spy)
        mp.setattr(plots, "save_image_grid", grid_spy)
        mp.setattr(E, "train_test_classifier", classifier_spy)
        result = E.evaluate_model(model_copy, num_samples=3, steps=2, out=tmp_path_factory.mktemp("spied"),
                                  feature_epochs=1, tstr_epochs=1, diversity_pairs=2, kid_subsets=2, umap=False,
                                  render_card=False, fd_resamples=FEW_RESAMPLES, progress=False, device="cpu")
    return result, calls


def test_samples_png_of_a_class_shows_that_class(spied):
    _, calls = spied
    labels, images = calls["samples"]
    for c, name in enumerate(["AD", "NC"]):
        assert torch.equal(calls["grids"][f"samples_{name}.png"], images[labels == c][:64])


def test_samples_png_says_what_it_shows(spied):
    """samples_<class>.png had no caption (generate's grid.png and the training grids have one): opened alone (a
    slide, the Hub) it said neither its class nor how it was sampled."""
    from PIL import Image

    from adni_diffusers.plots import to_pil_grid

    _, calls = spied
    for name in ("AD", "NC"):
        caption = calls["captions"][f"samples_{name}.png"]
        assert caption and f"class {name}" in caption and "guidance 2" in caption and "seed 0" in caption, caption
        assert "3 images" in caption, caption
    bare = to_pil_grid(calls["grids"]["samples_AD.png"], 8)
    assert Image.open(calls["paths"]["samples_AD.png"]).height > bare.height  # a caption band above the images


def test_tstr_trains_on_the_samples_and_trtr_on_real_training_slices(spied, model_copy):
    result, calls = spied
    fidelity = result["class_fidelity"]
    assert fidelity["tstr"]["accuracy"] == 0.25 and fidelity["trtr"]["accuracy"] == 0.75
    data, _ = E.load_evaluation_data(model_copy)
    (tstr_train, tstr_test), (trtr_train, trtr_test) = calls["classifier"]
    assert tstr_test == trtr_test == data.val.paths  # both tested on the real held-out slices
    assert len(tstr_train) == 6 and all(p.startswith("generated/") for p in tstr_train)
    assert set(trtr_train) <= set(data.train.paths)
    assert calls["classifier_names"] == ["TSTR classifier", "TRTR classifier"]  # their log lines say so


def test_a_changed_data_folder_is_flagged_and_the_training_data_is_not(model_copy, demo_root, tmp_path, caplog):
    """`matches_training`: the split recomputed from the training data equals the recorded one; a data folder that
    lost a training slice since training is warned about (held-out may then hold images the model saw)."""
    import logging

    data, record = E.load_evaluation_data(model_copy)
    assert record["matches_training"] is True
    changed = tmp_path / "AD_NC"
    shutil.copytree(demo_root, changed)
    (changed / Path(data.train.paths[0]).relative_to(data.root)).unlink()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, record = E.load_evaluation_data(model_copy, changed)
    assert record["matches_training"] is False and "differs from the one training recorded" in caplog.text
    assert re.search(r"\(\d+ images of \d+ patients \(AD \d+, NC \d+\), patient list [0-9a-f]{8} now", caplog.text)


def test_records_without_a_split_summary_cannot_confirm_the_split(tiny_ldm, tmp_path, caplog):
    """A folder whose training_data.json holds no train / validation summary (a copy saved without the training
    records) has nothing to compare the redrawn split with: `matches_training` was True, and `counterfactual
    --measure` recorded `split_matches_training: true` of a guessed split. None now ("cannot be confirmed"), with a
    warning; one summary is still compared."""
    import logging

    saved = json.loads((tiny_ldm / "training_data.json").read_text())
    (tmp_path / "training_data.json").write_text(
        json.dumps({k: v for k, v in saved.items() if k not in ("train", "validation")}))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, record = E.load_evaluation_data(tmp_path)
    assert record["matches_training"] is None and "cannot be confirmed" in caplog.text
    (tmp_path / "training_data.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "validation"}))
    assert E.load_evaluation_data(tmp_path)[1]["matches_training"] is True


def test_a_saved_model_inside_a_training_folder_is_pointed_to_that_folder(tiny_vq, tiny_ldm):
    """`--model vq/vqvae` (the saved model inside a training output folder, which holds no records of its own)
    was told to pass --data-dir; the folder that holds the records is named instead. A folder with no records
    above it keeps the --data-dir hint (evaluate takes a saved pipeline with --data-dir)."""
    for model in (tiny_vq, tiny_ldm):
        with pytest.raises(E.EvaluationError, match=re.escape(f"{model} holds the training records: give --model "
                                                              f"{model} ")):
            E.load_evaluation_data(model / "vqvae")
    with pytest.raises(E.EvaluationError, match="records no data folder; pass --data-dir"):
        E.load_evaluation_data(tiny_vq.parent)


def test_a_data_folder_changed_since_training_is_not_blamed_on_the_vqmodel(tiny_ldm, tmp_path, caplog):
    """Both stages trained on one folder, which was rebuilt since (demo-data --overwrite with more subjects): the
    split's warnings say the data changed; the VQModel's record differs from today's split only for that reason, and
    the warning that it "was trained on another folder or split" sent the user after a mix-up that never happened
    (a helper's README walk, 2026-12-07). A VQModel that did hold out other patients is still named."""
    import logging

    from adni_diffusers.demo_data import build_demo_dataset

    model = Path(shutil.copytree(tiny_ldm, tmp_path / "ldm", ignore=shutil.ignore_patterns("checkpoint-*")))
    rebuilt = tmp_path / "AD_NC"
    build_demo_dataset(rebuilt, subjects=10, slices_per_subject=4, seed=0, workers=1, contact_sheet=False)
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, record = E.load_evaluation_data(model, rebuilt)
    assert record["matches_training"] is False and "differs from the one training recorded" in caplog.text
    assert record["first_stage_held_out"] is False and "VQModel (first stage)" not in caplog.text
    saved = json.loads((model / "training_data.json").read_text())
    saved["vqmodel_data"]["validation_patients_sha256"] = "0" * 64  # the VQModel held out others at training
    (model / "training_data.json").write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        E.load_evaluation_data(model, rebuilt)
    assert "the VQModel (first stage) held out other patients than these" in caplog.text


def test_a_first_stage_that_held_out_other_patients_is_flagged(model_copy, caplog):
    """train_unet only warns when its VQModel was trained on another folder (whose held-out patients it cannot
    check); evaluate, held-out and counterfactual then called slices the VQModel may have trained on "held-out",
    without a word. The pipeline's record of its VQModel's held-out patients is compared with the split's now."""
    import logging

    _, record = E.load_evaluation_data(model_copy)
    assert record["first_stage_held_out"] is True  # the demo's VQModel and UNet held out the same patients
    path = model_copy / "training_data.json"
    original = path.read_text()  # (the module's shared copy: put back at the end)
    saved = json.loads(original)
    # the same names holding other images (a VQModel of a re-export that numbered the patients otherwise): every
    # name-based check had passed (a helper's audit, 2026-12-06)
    path.write_text(json.dumps({**saved, "vqmodel_data": {**saved["vqmodel_data"],
                                                          "validation_pixels_sha256": "0" * 64}}))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        assert E.load_evaluation_data(model_copy)[1]["first_stage_held_out"] is False
    # the same patient names: not "other patients" (slices added to the folder said so, as if patients had changed)
    assert "held out patients of these names but other images of them" in caplog.text
    assert "other patients than these" not in caplog.text
    caplog.clear()
    saved["vqmodel_data"]["validation_patients_sha256"] = "0" * 64  # a VQModel trained on another folder
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, record = E.load_evaluation_data(model_copy)
    assert record["first_stage_held_out"] is False and "the VQModel (first stage) held out other patients" in \
        caplog.text
    del saved["vqmodel_data"]  # a record that does not say
    path.write_text(json.dumps(saved))
    assert E.load_evaluation_data(model_copy)[1]["first_stage_held_out"] is None
    # a UNet trained on a bare vqvae/ folder (no train_vqmodel.py records): only train_unet's log had said so, and
    # evaluate, held-out and the card then called the slices held out without a word (a helper's audit, 2026-12-06)
    saved["vqmodel_data"] = None
    path.write_text(json.dumps(saved))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, record = E.load_evaluation_data(model_copy)
    assert record["first_stage_held_out"] is None and record["first_stage_unconfirmed"] is True
    assert "that the VQModel never trained on these held-out slices cannot be confirmed" in caplog.text
    path.write_text(original)


def test_held_out_slices_of_other_pixels_under_the_same_names_are_flagged(model_copy, caplog):
    """A re-export that numbers the patients otherwise keeps every file and patient name, so the names' checks
    passed and evaluate called training patients "never seen" (a helper's audit, 2026-12-06). The records hold
    each split's pixel digest since 2026-12-06; a digest that differs is a split that differs."""
    import logging

    _, record = E.load_evaluation_data(model_copy)
    assert record["matches_training"] is True
    path = model_copy / "training_data.json"
    original = path.read_text()
    saved = json.loads(original)
    assert len(saved["validation"]["pixels_sha256"]) == 64
    path.write_text(json.dumps({**saved, "validation": {**saved["validation"], "pixels_sha256": "0" * 64}}))
    try:
        with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
            _, record = E.load_evaluation_data(model_copy)
    finally:
        path.write_text(original)
    assert record["matches_training"] is False
    assert "the validation split holds other images than at training under the same file and patient names" \
        in caplog.text
    del saved["validation"]["pixels_sha256"]  # a record from before the digest: the names alone, as before
    path.write_text(json.dumps(saved))
    try:
        assert E.load_evaluation_data(model_copy)[1]["matches_training"] is True
    finally:
        path.write_text(original)


def test_a_model_trained_without_a_hold_out_is_refused_before_any_work(model_copy, tmp_path, monkeypatch):
    """--split all held nothing out: refused with the reason, before the feature net is trained."""
    import adni_diffusers.features as features

    def no_work(*args, **kwargs):
        raise AssertionError("the feature net was trained for a model with nothing held out")

    monkeypatch.setattr(features, "get_or_train_feature_net", no_work)
    folder = tmp_path / "all"
    shutil.copytree(model_copy, folder, ignore=shutil.ignore_patterns("evaluation", "feature_net"))
    record = json.loads((folder / "training_data.json").read_text())
    (folder / "training_data.json").write_text(json.dumps({**record, "split": "all"}))
    with pytest.raises(E.EvaluationError, match=r"no patients were held out.*retrain with --split patient"):
        E.evaluate_model(folder, num_samples=2, out=tmp_path / "out", device="cpu", progress=False,
                         render_card=False)


def test_a_data_dir_too_small_to_hold_out_a_patient_is_named_not_the_model(model_copy, demo_root, tmp_path):
    """--data-dir with one patient per class: the error said the model "trained with --split patient: no patients
    were held out", which it did; it is the given folder that holds none out."""
    small = tmp_path / "small"
    for cls in ("AD", "NC"):
        first = sorted((demo_root / "train" / cls).iterdir())[0]
        patient = first.name.rsplit("_", 1)[0]
        (small / "train" / cls).mkdir(parents=True)
        for f in (demo_root / "train" / cls).glob(f"{patient}_*"):
            shutil.copy(f, small / "train" / cls / f.name)
    held_out = json.loads((model_copy / "training_data.json").read_text())["validation"]["patients"]
    assert held_out > 0
    with pytest.raises(E.EvaluationError, match=re.escape(
            f"--data-dir {small}: --split patient (the model's) holds out no patients of it (--split patient holds "
            f"out only classes with 2 or more patients), while {model_copy} held out {held_out} of its own")):
        E.load_evaluation_data(model_copy, small)

    # a hand-edited record whose split summaries are not objects: no summary to compare (it crashed with AttributeError)
    edited = tmp_path / "edited"
    shutil.copytree(model_copy, edited, ignore=shutil.ignore_patterns("evaluation", "feature_net", "vqvae", "unet"))
    record = json.loads((edited / "training_data.json").read_text())
    (edited / "training_data.json").write_text(json.dumps({**record, "train": ["x"], "validation": "12 patients"}))
    data, loaded = E.load_evaluation_data(edited, demo_root)
    assert len(data.val) > 0 and loaded["matches_training"] is None  # nothing to compare: not confirmed


def test_a_data_folder_the_models_settings_refuse_is_named_without_training_flags(model_copy, demo_root, tmp_path):
    """evaluate, held-out and counterfactual take the model's recorded split and preprocessing: the loader's hints
    said "use --preprocess resize" or "use --split patient", flags these commands lack (an argparse error next)."""
    import numpy as np
    from PIL import Image

    other_size = tmp_path / "other_size"
    shutil.copytree(demo_root, other_size)
    first = sorted((other_size / "train" / "AD").iterdir())[0]
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(first)
    with pytest.raises(E.DataError) as refused:
        E.load_evaluation_data(model_copy, other_size)
    assert "the model was trained with --preprocess pad, which takes these sizes only" in str(refused.value)
    assert "--preprocess resize" not in str(refused.value)
    (first.parent / "no_patient_part.jpeg").write_bytes(first.read_bytes())
    first.unlink()
    with pytest.raises(E.DataError, match=r"Rename them \(the model was trained with --split patient\)$"):
        E.load_evaluation_data(model_copy, other_size)


def test_a_held_out_set_too_small_to_compare_is_refused_before_any_work(model_copy, tmp_path, monkeypatch):
    """A single held-out slice (a tiny test/ folder under --split given) leaves one image per set for FD and KID:
    refused once the data is loaded, before the feature net is trained and the samples drawn (it failed in the
    metrics, after both)."""
    import dataclasses

    import adni_diffusers.features as features

    def no_work(*args, **kwargs):
        raise AssertionError("the feature net was trained for a held-out set of one slice")

    load = E.load_evaluation_data

    def one_held_out_slice(*args, **kwargs):
        data, record = load(*args, **kwargs)
        return dataclasses.replace(data, val=data.val.subset([0])), record

    monkeypatch.setattr(features, "get_or_train_feature_net", no_work)
    monkeypatch.setattr(E, "load_evaluation_data", one_held_out_slice)
    with pytest.raises(E.EvaluationError, match=r"1 image\(s\) for the distribution metrics .*held-out slices: 1\)"
                                                r": they need at least 2"):
        E.evaluate_model(model_copy, num_samples=2, out=tmp_path / "out", device="cpu", progress=False,
                         render_card=False)


def test_stratified_rows_give_the_leftover_row_to_the_largest_remainder():
    from adni_diffusers.vq_eval import stratified_rows

    labels = torch.tensor([0] * 6 + [1] * 4)  # 3 rows: quotas 1.8 and 1.2
    rows = stratified_rows(labels, 3, seed=0)
    assert labels[rows].bincount().tolist() == [2, 1]


def test_a_rerun_removes_the_earlier_runs_outputs_and_keeps_other_files(evaluated, model_copy, tmp_path):
    """Before: a rerun with --no-umap (and without --ablations) left the earlier umap.png and ablation figures in
    --out, in neither the new metrics.json nor report.md, and `push` uploaded them as this run's."""
    _, earlier = evaluated
    out = tmp_path / "evaluation"
    shutil.copytree(earlier, out)  # everything a full run writes, ablations and UMAP included
    (out / "samples_MCI.png").write_bytes(b"an older model's class")
    (out / "notes.md").write_text("mine")
    cache = out / "feature_net"  # a feature-net cache inside --out is no output
    shutil.copytree(model_copy / "feature_net", cache)
    rc = cli.main(["evaluate", "--model", str(model_copy), "--out", str(out), "--feature-cache", str(cache),
                   "--num-samples", "2", "--steps", "2", "--feature-epochs", "1", "--tstr-epochs", "1",
                   "--diversity-pairs", "2", "--kid-subsets", "2", "--no-umap", "--no-card", "--device", "cpu",
                   "--fd-resamples", str(FEW_RESAMPLES)])
    assert rc == 0
    for name in ("umap.png", "ablations.png", "ablations.csv", "samples_MCI.png"):
        assert not (out / name).exists(), name
    assert (out / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for p in (model_copy / "feature_net").iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_net"]["cached"] is True and "umap" not in metrics["files"]
    written = {"metrics.json", "report.md", "nn_distances.png", "closest_pairs.png", "samples_AD.png",
               "samples_NC.png", "features.safetensors"}
    assert {p.name for p in out.iterdir()} == written | {"notes.md", "feature_net"}


def test_a_model_folder_that_cannot_be_written_asks_for_out(model_copy, monkeypatch, capsys):
    """A labmate's model on a shared, read-only folder: "--out <model>/evaluation: cannot write there" named a flag
    the user never gave, and not what to do. (Root ignores permissions: the check is made to fail.)"""
    import adni_diffusers.generate as generate

    real = generate.cannot_write_in
    monkeypatch.setattr(generate, "cannot_write_in", lambda folder: "cannot write there (Permission denied)"
                        if Path(folder).is_relative_to(model_copy) else real(folder))
    rc = cli.main(["evaluate", "--model", str(model_copy), "--num-samples", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--out {model_copy / 'evaluation'}: cannot write there (Permission denied)" in err
    assert "(the default, beside the model): give --out a folder you can write" in err


def test_an_out_that_is_a_file_is_refused_before_any_work(model_copy, tmp_path, monkeypatch, capsys):
    """Before: "error: [Errno 17] File exists", naming no flag."""
    import adni_diffusers.features as features
    import adni_diffusers.generate as generate

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(generate, "load_pipeline", no_work)
    monkeypatch.setattr(features, "get_or_train_feature_net", no_work)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    rc = cli.main(["evaluate", "--model", str(model_copy), "--num-samples", "2", "--out", str(afile)])
    assert rc == 2
    assert f"--out {afile}: exists and is not a folder" in capsys.readouterr().err
    assert afile.read_text() == "mine"
    # a folder inside that file: "[Errno 20] Not a directory", naming no flag
    rc = cli.main(["evaluate", "--model", str(model_copy), "--num-samples", "2", "--out", str(afile / "sub")])
    assert rc == 2
    assert f"--out {afile / 'sub'}: {afile} is a file, not a folder" in capsys.readouterr().err


def test_classifier_epochs_are_logged_under_its_name(model_copy, caplog):
    """Before: the TSTR / TRTR classifiers logged "feature net epoch 1/2", right after "feature net reused"."""
    import logging

    data, _ = E.load_evaluation_data(model_copy)
    train = data.train.subset(E.subsample(data.train.labels, {0: 4, 1: 4}, seed=0))
    recipe = {"epochs": 2, "seed": 0, "device": "cpu", "widths": (8, 8, 8, 8), "input_size": 64}
    with caplog.at_level(logging.INFO, logger="adni_diffusers.features"):
        E.train_test_classifier(train, data.val, recipe, name="TSTR classifier")
    assert "TSTR classifier epoch 1/2" in caplog.text and "TSTR classifier epoch 2/2" in caplog.text
    assert "feature net" not in caplog.text


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_guidance_must_be_finite_when_parsed(value, capsys):
    """Before: --guidance nan was accepted and every latent came out NaN."""
    import argparse

    from adni_diffusers.evaluate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", f"--guidance={value}"])  # "-inf" alone would read as an option
    assert f"--guidance: {value}: expected a finite number" in capsys.readouterr().err
    assert parser.parse_args(["--model", "m", "--guidance", "3"]).guidance == 3.0


def test_sample_images_gives_the_pipeline_its_own_scheduler_back(model_copy):
    """`sample_images` swaps in the asked-for sampler for its call only: afterwards the pipeline holds its own
    scheduler OBJECT again (the existing check compares class names, which a fresh DDPM copy also passes)."""
    from adni_diffusers.pipeline_adni_ldm import ADNILatentDiffusionPipeline

    pipe = ADNILatentDiffusionPipeline.from_pretrained(model_copy)
    own = pipe.scheduler
    E.sample_images(pipe, [0], scheduler="ddim", steps=2, seed=0, progress=False)
    assert pipe.scheduler is own


def test_refinement_is_recommended_only_where_it_keeps_recall():
    """`recommend` suggests a refinement setting for a clear FD gain (> 5%) only when recall stays within 0.02 of
    the row without refinement: a lower FD bought with lost coverage is no gain."""
    off = {"group": "refinement", "setting": "off", "fd": 10.0, "recall": 0.5, "refine_steps": 0,
           "refine_repeats": 0, "scheduler": "ddpm"}
    lower_recall = {**off, "setting": "original 30x5", "fd": 8.0, "recall": 0.3, "refine_steps": 30, "refine_repeats": 5}
    assert E.recommend([off, lower_recall], {})["refinement"]["setting"] == "off"
    same_recall = {**lower_recall, "recall": 0.49}
    assert E.recommend([off, same_recall], {})["refinement"]["setting"] == "original 30x5"


def test_refinement_needs_a_gain_beyond_what_resampled_patients_and_seeds_explain():
    """The 5% rule was far inside the noise of a few held-out patients: with the paired interval of the gain
    measured, refinement is recommended only where its lower end is above 0, and the reason names the interval."""
    off = {"group": "refinement", "setting": "off", "fd": 10.0, "recall": 0.5, "refine_steps": 0,
           "refine_repeats": 0, "scheduler": "ddpm"}
    on = {**off, "setting": "original 30x5", "fd": 8.0, "refine_steps": 30, "refine_repeats": 5}
    within_chance = E.recommend([off, on], {}, refinement_gain=[-0.12, 0.41])["refinement"]
    assert within_chance["setting"] == "off" and within_chance["gain_interval"] == [-0.12, 0.41]
    assert "95% interval of the gain over resampled held-out patients and seeds: -12% to +41%" in within_chance["why"]
    beyond = E.recommend([off, on], {}, refinement_gain=[0.03, 0.35])["refinement"]
    assert beyond["setting"] == "original 30x5" and "+3% to +35%" in beyond["why"]


def test_a_gain_that_rounds_to_zero_prints_without_a_sign():
    """A small negative gain printed "-0%" in the ablation table (UniPC-10's interval on the demo). Below 1% the
    sign shows to a tenth: intervals of [+0.001, +0.047] and [-0.0011, +0.071] had both read "0% to ...", although
    only the second spans 0 (a helper's demo evaluation, 2026-12-06)."""
    assert [E._signed_pct(x) for x in (-0.0004, 0.0, 0.0004, 0.006, -0.45, 0.11)] == ["0%", "0%", "0%", "+1%",
                                                                                    "-45%", "+11%"]
    assert [E._signed_pct(x) for x in (0.001, -0.0011, -0.004, 0.0049)] == ["+0.1%", "-0.1%", "-0.4%", "+0.5%"]
    assert E._signed_pct(float("nan")) == "nan%"  # an FD that came out NaN: no crash of the whole report


def test_an_fd_interval_holds_its_own_fd_and_alike_sets_get_overlapping_ones():
    """A resample repeats images, and repeats alone raise FD: the plain percentiles lay above the measured FD (a
    reviewer's simulation: FD 21.4, interval 37.6 to 43.5), and a generated set drawn like the real data looked
    worse than the floor. The ranges are centred on the measured FDs: each holds its own, and two sets from one
    distribution overlap."""
    g = torch.Generator().manual_seed(1)
    held, gen, train = (torch.randn(n, 16, generator=g) for n in (120, 120, 400))
    zeros = torch.zeros
    train_groups = zeros(400, dtype=torch.long)
    fd = E.M.frechet_distance(held, gen)
    floor = E.M.frechet_distance(held, train[E.subsample(train_groups, {0: 120}, 1)])
    iv = E.fd_intervals(held_feats=held, held_groups=zeros(120, dtype=torch.long),
                        held_patients=[f"p{i}" for i in range(120)], gen_feats=gen,
                        gen_groups=zeros(120, dtype=torch.long), train_feats=train, train_groups=train_groups,
                        counts={0: 120}, seed=0, measured=(fd, floor), resamples=100)
    assert iv["fd"][0] < fd < iv["fd"][1] and iv["floor_fd"][0] < floor < iv["floor_fd"][1], (fd, floor, iv)
    assert iv["fd"][0] < iv["floor_fd"][1] and iv["floor_fd"][0] < iv["fd"][1]


def test_the_paired_gain_cancels_what_two_rows_of_the_same_seeds_share():
    """Rows sampled from the same seeds share most of their FD's chance; resampled jointly, a row against itself
    gains exactly 0, a row slightly off everywhere loses a little in every resample (an interval below 0), while
    each row's own FD moves far more from resample to resample."""
    g = torch.Generator().manual_seed(0)
    patients = [f"p{i}" for i in range(6) for _ in range(8)]
    held = torch.randn(6, 5, generator=g).repeat_interleave(8, 0) + 0.3 * torch.randn(48, 5, generator=g)
    base = torch.randn(40, 5, generator=g)
    worse = base + 0.3
    zeros = torch.zeros

    def gain(other):
        return E.paired_fd_gain(held_feats=held, held_groups=zeros(48, dtype=torch.long), held_patients=patients,
                                base_feats=base, other_feats=other, gen_groups=zeros(40, dtype=torch.long), seed=0)

    assert gain(base) == [0.0, 0.0]
    low, high = gain(worse)
    fd = E.M.frechet_distance(held, base)
    spread = E.fd_intervals(held_feats=held, held_groups=zeros(48, dtype=torch.long), held_patients=patients,
                            gen_feats=base, gen_groups=zeros(40, dtype=torch.long), train_feats=held,
                            train_groups=zeros(48, dtype=torch.long), counts={0: 40}, seed=0,
                            measured=(fd, fd))["fd"]
    assert low < high < 0 and (high - low) < (spread[1] - spread[0]) / fd, (low, high, spread, fd)


def test_the_paired_gains_range_keeps_the_resampled_gains_own_skew():
    """The range is the resampled gains' own spread, moved onto the measured gain: its lower tail is the gains' lower
    one. A gain with its sign flipped in the resamples mirrored the spread and went unnoticed where it is symmetric;
    here the gains are skewed (lower tail 0.55, upper 0.40), recomputed from the same draws."""
    g = torch.Generator().manual_seed(0)
    patients = [f"p{i}" for i in range(6) for _ in range(8)]
    held = torch.randn(6, 5, generator=g).repeat_interleave(8, 0) + 0.3 * torch.randn(48, 5, generator=g)
    base = torch.randn(40, 5, generator=g)
    other = base * 1.5
    held_groups, gen_groups = torch.zeros(48, dtype=torch.long), torch.zeros(40, dtype=torch.long)
    low, high = E.paired_fd_gain(held_feats=held, held_groups=held_groups, held_patients=patients, base_feats=base,
                                 other_feats=other, gen_groups=gen_groups, seed=0)
    draw, gains = E.PatientBootstrap(held_groups, patients, gen_groups, 0), []
    for _ in range(E.FD_RESAMPLES):  # the same draws, in the same order
        rows, gen = draw.held(), draw.generated()
        fd_base = E.M.frechet_distance(held[rows], base[gen])
        gains.append((fd_base - E.M.frechet_distance(held[rows], other[gen])) / fd_base)
    tail_low, median, tail_high = np.percentile(gains, [2.5, 50, 97.5])
    assert (median - tail_low) - (tail_high - median) > 0.1  # skewed: a mirrored range would differ
    fd = E.M.frechet_distance(held, base)
    measured = (fd - E.M.frechet_distance(held, other)) / fd
    assert low == pytest.approx(measured - (median - tail_low)) and high == pytest.approx(measured + (tail_high - median))


def test_compare_features_lowers_k_for_sets_of_k_rows_or_fewer():
    """"k is lowered for tiny sets": the k-NN radius needs k OTHER rows, so sets of 2 or 3 rows (the smallest
    evaluation, an ablation row of 2 samples) get k = n - 1, not an error from precision_recall."""
    g = torch.Generator().manual_seed(0)
    for n in (2, 3):
        reference, candidate = torch.randn(n, 4, generator=g), torch.randn(n + 5, 4, generator=g)
        m = E.compare_features(reference, candidate, kid_subsets=2)
        assert m["k"] == n - 1
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0


def test_fd_rank_note_flags_fewer_images_than_feature_dimensions(evaluated, tmp_path):
    """FD with fewer images per set than feature dimensions (the default 100 per class against the feature
    net's 256) has singular covariances: the report says so, and says nothing at N >= dims."""
    result, out = evaluated
    gen = json.loads((out / "metrics.json").read_text())["realism"]["generated"]
    dims = gen["feature_dims"]
    n = min(gen["reference_images"], gen["candidate_images"])
    assert n < dims  # the test evaluation is small
    assert f"FD compares {n} images per set in {dims} feature dimensions" in (out / "report.md").read_text()
    at_dims = {**gen, "reference_images": dims, "candidate_images": dims}
    assert E.fd_rank_note(at_dims) is None
    assert E.fd_rank_note({**at_dims, "candidate_images": dims - 1}) is not None
    assert E.fd_rank_note({k: v for k, v in gen.items() if k != "feature_dims"}) is None  # an older metrics.json
    # the remedy is per class for a set pooling classes: it said 256 per class where 128 of each make 256
    pooled = {"reference_images": 80, "candidate_images": 80, "feature_dims": 256}
    assert "; --num-samples 128 or more per class (256 in all) avoids it" in E.fd_rank_note(pooled, classes=2)
    assert "; --num-samples 256 or more avoids it" in E.fd_rank_note(pooled)
    res = {k: v for k, v in result.items() if k != "card"}
    res["realism"] = {**res["realism"], "generated": at_dims}
    summary = E.write_report(res, tmp_path).read_text().split("## Feature network")[0]
    assert "feature dimensions" not in summary  # the per-class and ablation tables keep their own N


# ------------------------------------------------------------------------------------------ sixth mutation audit


def test_image_seeds_of_different_classes_and_indices_never_collide():
    """`image_seed`: every (class, index) pair of a run gets its own noise; the 2nd AD sample must not share the
    1st NC sample's noise (two classes drawn from one noise would look alike and flatter diversity)."""
    seeds = [E.image_seed(0, label, i) for label in (None, 0, 1, 2) for i in range(1000)]
    assert len(set(seeds)) == len(seeds)
    assert E.image_seed(0, 0, 1) != E.image_seed(0, 1, 0)
    last = E.MAX_SAMPLES_PER_CLASS - 1  # the last index that keeps class 0 apart from class 1; past it, an error
    assert E.image_seed(0, 0, last) < E.image_seed(0, 1, 0)
    with pytest.raises(ValueError, match="sample index 100003"):
        E.image_seed(0, 0, last + 1)


def test_class_fidelity_per_class_accuracy_is_against_each_own_class():
    """`class_fidelity`: the accuracy of class c is the share of samples generated for c that the net calls c
    (the existing test's predictions give 0.5 for either reading)."""
    class Net:
        def predict(self, images, batch_size=64, device=None):
            return torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])  # calls: AD, NC, NC, NC

    out = E.class_fidelity(Net(), torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["AD", "NC"])
    assert out["per_class"] == {"AD": 0.5, "NC": 1.0} and out["accuracy"] == 0.75
    assert out["predicted_as"] == {"AD": {"AD": 1, "NC": 1}, "NC": {"AD": 0, "NC": 2}}


def test_predicted_class_shares_are_the_shares_called_each_class():
    """Unconditional models: the class-balance table gives, per class, the share of images the net assigns to it."""
    class Net:
        def predict(self, images, batch_size=64, device=None):
            return torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])

    shares = E.predicted_class_shares(Net(), torch.zeros(4, 8, 8, dtype=torch.uint8), ["AD", "NC"])
    assert shares == {"AD": 0.75, "NC": 0.25}


def test_train_test_classifier_tests_on_the_test_set_with_a_class_head_only(monkeypatch):
    """TSTR / TRTR: the fresh classifier is trained on `train` (class head only) and its accuracy is measured on
    `test` (the real held-out slices), never on what it was trained on."""
    calls = {}
    sentinel = object()

    def train_spy(train, val, **settings):
        calls["train"], calls["settings"] = train, settings
        return sentinel, {"train_seconds": 0.5}

    def evaluate_spy(net, slices, batch_size=256, device=None):
        calls["evaluated"] = (net, slices)
        return {"accuracy": 0.625, "patient_accuracy": 0.5, "accuracy_per_class": {"AD": 0.5, "NC": 0.75}}

    monkeypatch.setattr(Fe, "train_feature_net", train_spy)
    monkeypatch.setattr(Fe, "evaluate_feature_net", evaluate_spy)
    train, test = toy_slices(4, seed=0), toy_slices(2, seed=1)
    out = E.train_test_classifier(train, test, {"epochs": 3, "seed": 0}, name="TSTR classifier")
    assert calls["train"] is train and calls["settings"]["position_weight"] == 0.0
    assert calls["evaluated"][0] is sentinel and calls["evaluated"][1] is test
    assert out["accuracy"] == 0.625 and out["train_images"] == len(train) and out["test_images"] == len(test)


def _memorisation_inputs(n_held=100):
    """One training image at the origin (features) / uniform grey 100 (pixels); held-out images at distances
    1..n_held in feature space."""
    train_f = torch.zeros(1, 2)
    held_f = torch.stack([torch.arange(1, n_held + 1).float(), torch.zeros(n_held)], 1)
    train_px = torch.full((1, 64, 64), 100, dtype=torch.uint8)
    held_px = torch.full((n_held, 64, 64), 100, dtype=torch.uint8) + torch.arange(n_held, dtype=torch.uint8)[:, None, None]
    return train_f, held_f, train_px, held_px


def test_memorisation_threshold_is_the_low_percentile_of_held_out_distances():
    """`closer_than_heldout_p5`: the line is the 5th percentile of the held-out reals' distances to the training set
    (about 5% of held-out reals fall below it), not the 95th."""
    train_f, held_f, train_px, held_px = _memorisation_inputs()
    gen_f = torch.tensor([[3.0, 0.0], [50.0, 0.0]])  # one sample nearer than 5% of held-out reals, one not
    gen_px = torch.full((2, 64, 64), 100, dtype=torch.uint8)
    mem = E.memorisation(gen_f, train_f, held_f, gen_px, train_px, held_px)
    f = mem["features"]
    assert f["heldout_percentile_distance"] == pytest.approx(float(np.percentile(np.arange(1, 101), 5)))
    assert f["heldout_below_percentile"] == pytest.approx(0.05)
    assert f["closer_than_heldout_percentile"] == pytest.approx(0.5)


def test_memorisation_pixel_distances_are_rms_grey_levels():
    """Pixel distances are "RMS grey levels (0-255) at 64x64": a sample 10 grey levels brighter everywhere than a
    training image is 10 away."""
    train_f, held_f, train_px, held_px = _memorisation_inputs(20)
    gen_px = torch.full((1, 64, 64), 110, dtype=torch.uint8)
    mem = E.memorisation(torch.zeros(1, 2), train_f, held_f, gen_px, train_px, held_px)
    assert mem["pixels"]["generated_distance"][0] == pytest.approx(10.0, rel=1e-4)
    assert mem["pixels"]["heldout_distance"][:3] == pytest.approx([0.0, 1.0, 2.0], abs=1e-3)


def test_closest_pairs_picture_shows_the_samples_nearest_to_the_training_set(tmp_path, monkeypatch):
    """closest_pairs.png: "the k samples nearest to the training set", nearest first."""
    from adni_diffusers import plots

    captured = {}

    def grid_spy(rows, row_titles=None, col_titles=None, tile=128):
        captured["titles"] = row_titles
        return SimpleNamespace(save=lambda path: None)

    monkeypatch.setattr(plots, "captioned_grid", grid_spy)
    px = torch.zeros(5, 16, 16, dtype=torch.uint8)
    gen = E.as_slice_set(px, [0, 1, 0, 1, 0], ["AD", "NC"])
    train = E.as_slice_set(px[:2], [0, 1], ["AD", "NC"], prefix="train")
    held = E.as_slice_set(px[:3], [0, 1, 0], ["AD", "NC"], prefix="held")
    space = {"generated_distance": [5.0, 1.0, 4.0, 2.0, 3.0], "generated_nearest": [0, 1, 0, 1, 0],
             "heldout_distance": [7.0, 6.0, 8.0], "heldout_nearest": [0, 0, 1]}
    E.plot_closest_pairs({"features": space, "pixels": space}, gen, train, held, tmp_path / "c.png", k=2)
    titles = captured["titles"]
    assert "f 1.00" in titles[0] and "f 2.00" in titles[1]  # the two nearest samples, nearest first
    assert titles[0].startswith("gen NC")
    assert "REAL" in titles[2] and "f 6.00" in titles[2]  # then the nearest held-out real


def _sampler_row(setting, fd, seconds):
    return {"group": "sampler", "setting": setting, "fd": fd, "seconds": seconds, "recall": 0.5}


def test_recommended_fast_sampler_is_the_fastest_within_10_percent_of_the_lowest_fd():
    """`recommend`: "fastest_within_10pct_of_lowest_fd" is the quickest sampler whose FD is within 10% of the best."""
    rows = [_sampler_row("ddpm-1000", 1.0, 100.0), _sampler_row("ddim-50", 1.3, 5.0),
            _sampler_row("unipc-10", 1.05, 1.0)]
    rec = E.recommend(rows, {"fd": 0.5})["sampler"]
    assert rec == {"lowest_fd": "ddpm-1000", "fastest_within_10pct_of_lowest_fd": "unipc-10"}


def test_recommended_guidance_is_the_scale_with_the_highest_class_accuracy():
    """`recommend`: "highest_class_accuracy" names the guidance scale whose samples the net classifies best."""
    rows = [{"group": "guidance", "guidance": w, "fd": fd, "class_accuracy": acc}
            for w, fd, acc in ((1.0, 2.0, 0.5), (3.0, 1.0, 0.9), (5.0, 3.0, 0.7))]
    rec = E.recommend(rows, {"fd": 0.5})["guidance"]
    assert rec == {"lowest_fd": 3.0, "highest_class_accuracy": 3.0}


def test_recommended_refinement_is_the_one_with_the_lowest_fd():
    """`recommend`: of the refinement settings with a clear gain, the one with the lowest FD is suggested."""
    off = {"group": "refinement", "setting": "off", "fd": 10.0, "recall": 0.5, "refine_steps": 0,
           "refine_repeats": 0, "scheduler": "dpm++"}
    seed = {**off, "setting": "original 30x5", "fd": 9.0, "refine_steps": 2, "refine_repeats": 5}
    mild = {**off, "setting": "milder 10x2", "fd": 5.0, "refine_steps": 1, "refine_repeats": 2}
    rec = E.recommend([off, seed, mild], {"fd": 1.0})["refinement"]
    assert rec["setting"] == "milder 10x2" and rec["refine_repeats"] == 2


def test_summary_numbers_put_each_floor_beside_its_own_measure():
    """metrics.json's top level (the model card's table): every floor entry holds the floor's number, never the
    generated one."""
    def m(base):
        return {"fd": base + 0.1, "kid": base + 0.2, "precision": base / 10 + 0.03, "recall": base / 10 + 0.04,
                "k": 3, "candidate_images": 8, "reference_images": 8}

    res = {"realism": {"generated": m(1), "floor": m(2), "vq_ceiling": m(3)},
           "diversity": {"generated": {"mean": 0.61}, "real": {"mean": 0.62}},
           "memorisation": {"features": {"closer_than_heldout_percentile": 0.125}},
           "timings": {"sampling_seconds_per_image": 0.25}}
    s = E.summary_numbers(res)
    floor = E.FLOOR_LABEL
    fd, kid = E.M.FD_NAME, E.M.KID_NAME
    assert s[fd] == 1.1 and s[f"{fd}, {floor}"] == 2.1 and s[f"{fd}, {E.CEILING_LABEL}"] == 3.1
    assert s[kid] == 1.2 and s[f"{kid}, {floor}"] == 2.2
    assert s["precision (adni-features, k=3)"] == pytest.approx(0.13)
    assert s[f"precision (adni-features, k=3), {floor}"] == pytest.approx(0.23)
    assert s["recall (adni-features, k=3)"] == pytest.approx(0.14)
    assert s[f"recall (adni-features, k=3), {floor}"] == pytest.approx(0.24)
    assert s["MS-SSIM diversity, generated (lower = more diverse)"] == 0.61
    assert s["MS-SSIM diversity, real held-out"] == 0.62
    # the memorisation share beside its floor: the held-out slices' own share (the nominal 5% for older records)
    assert s["memorisation: share of samples nearer to training than held-out p5"] == 0.125
    assert s["memorisation, floor: the held-out slices' own share"] == 0.05
    res["memorisation"]["features"]["heldout_below_percentile"] = 0.125
    assert E.summary_numbers(res)["memorisation, floor: the held-out slices' own share"] == 0.125


def test_clean_turns_nan_and_inf_into_null_for_strict_json():
    """metrics.json must be valid JSON: NaN (e.g. diversity with no real pairs) and inf become null."""
    cleaned = E._clean({"a": math.nan, "b": [1.0, math.inf], "c": np.float32("nan"), "d": torch.tensor([0.5])})
    assert cleaned == {"a": None, "b": [1.0, None], "c": None, "d": [0.5]}
    json.dumps(cleaned, allow_nan=False)


def test_a_single_sample_is_refused_before_any_work(tmp_path, monkeypatch):
    """--num-samples 1: refused at once ("at least 2"), not after the feature net is trained and samples drawn."""
    import adni_diffusers.features as features
    import adni_diffusers.generate as generate

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --num-samples was checked")

    monkeypatch.setattr(generate, "load_pipeline", no_work)
    monkeypatch.setattr(features, "get_or_train_feature_net", no_work)
    (tmp_path / "model_index.json").write_text("{}")
    for bad in (1, E.MAX_SAMPLES_PER_CLASS + 1):  # too many would share noise seeds across classes
        with pytest.raises(E.EvaluationError, match=rf"--num-samples {bad}: expected 2 to 100003"):
            E.evaluate_model(tmp_path, num_samples=bad, out=tmp_path / "out", device="cpu", progress=False,
                             render_card=False)


def test_training_record_keeps_the_recorded_preprocessing(tmp_path):
    """A model trained with --preprocess resize is evaluated on resized slices: the record says so (from
    training_data.json, else training_args.json); "pad" only when neither records it."""
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "preprocess": "resize"}))
    assert E.read_training_record(tmp_path)["preprocess"] == "resize"
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data"}))
    (tmp_path / "training_args.json").write_text(json.dumps({"preprocess": "resize"}))
    assert E.read_training_record(tmp_path)["preprocess"] == "resize"
    (tmp_path / "training_args.json").write_text(json.dumps({}))
    assert E.read_training_record(tmp_path)["preprocess"] == "pad"
    # the pipeline's own record (model_index.json), where a saved or pushed folder has no training records
    (tmp_path / "model_index.json").write_text(json.dumps({"preprocess": "resize"}))
    assert E.read_training_record(tmp_path)["preprocess"] == "resize"


def test_sample_images_returns_the_pipelines_images_on_the_minus_one_to_one_scale():
    """`sample_images`: "float (N, 1, 256, 256) in [-1, 1]" from the pipeline's "pt" output in [0, 1] (black stays
    black: -1, white +1), in the order of `labels`."""
    from diffusers import DDPMScheduler

    class Pipe:
        scheduler = DDPMScheduler(num_train_timesteps=20)

        def set_progress_bar_config(self, **kw):
            pass

        def __call__(self, batch_size, class_labels=None, **kw):
            value = torch.tensor([float(c) for c in class_labels])  # class 0 black, class 1 white
            return SimpleNamespace(images=value.view(-1, 1, 1, 1).expand(batch_size, 1, 256, 256).clone())

    out = E.sample_images(Pipe(), [1, 0, 1], scheduler="ddim", steps=2, progress=False, batch_size=2)
    assert out.shape == (3, 1, 256, 256)
    assert out[0].unique().tolist() == [1.0] and out[1].unique().tolist() == [-1.0]
    assert out[2].unique().tolist() == [1.0]


# ========================================================== evaluate_model's wiring, with a stand-in pipeline
# The real pipeline is not sampled: a stub whose images depend on the per-image generators only (so every ablation
# row, whatever its setting, draws the same images from the same seeds), and whose VQ round trip is the identity.
# A tiny feature net (1 epoch, widths 4-8, 32 px). Seconds, not a model evaluation.


class _StubPipe:
    is_conditional = True
    config = SimpleNamespace(class_names=["AD", "NC"])
    null_class = 2

    def __init__(self):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler(num_train_timesteps=1000)

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, batch_size, generator, **kw):
        images = torch.stack([torch.rand(1, 256, 256, generator=g) for g in generator])
        return SimpleNamespace(images=images)

    def encode(self, pixels):
        return E.M.as_images(pixels)

    def decode(self, z, output_type="pt"):
        return (z + 1) / 2


def _stub_model_folder(model: Path, demo_root: Path) -> Path:
    """The records of a model trained on the demo set (patient split, half held out), for _StubPipe to stand in."""
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / "training_data.json").write_text(json.dumps({"root": str(demo_root), "split": "patient",
                                                           "class_names": ["AD", "NC"]}))
    (model / "training_args.json").write_text(json.dumps({"val_fraction": 0.5, "seed": 0}))
    return model


@pytest.fixture(scope="module")
def stub_evaluated(demo_root, tmp_path_factory):
    """evaluate_model on the demo set with the stub pipeline; records the `diversity` calls (their keywords) and
    the `class_fidelity` calls (their arguments)."""
    model = tmp_path_factory.mktemp("stub") / "model"
    _stub_model_folder(model, demo_root)
    calls = {"diversity": [], "class_fidelity": []}
    diversity, class_fidelity = E.diversity, E.class_fidelity

    def diversity_spy(*args, **kwargs):
        calls["diversity"].append(kwargs)
        return diversity(*args, **kwargs)

    def class_fidelity_spy(*args, **kwargs):
        calls["class_fidelity"].append(args)
        return class_fidelity(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "diversity", diversity_spy)
        mp.setattr(E, "class_fidelity", class_fidelity_spy)
        result = E.evaluate_model(model, num_samples=4, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                                  feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8,
                                                    "bn_images": 16},
                                  diversity_pairs=4, kid_subsets=3, ablations=True, ablation_samples=2,
                                  ablation_step_overrides={"ddpm": 6, "ddim": 3, "dpm++": 3, "unipc": 2},
                                  fd_resamples=FEW_RESAMPLES, umap=False, render_card=False, progress=False,
                                  device="cpu", pipe=_StubPipe())
    return result, model, calls


def test_a_split_that_differs_from_trainings_does_not_replace_the_models_evaluation(demo_root, tmp_path):
    """A --data-dir whose split differs from the recorded one (the train/ subfolder given for the root; a folder
    changed since) gave "held-out" numbers of patients the model trained on, written into <model>/evaluation and
    the card with a log warning only. Refused there, before anything is written; --out elsewhere measures it."""
    from adni_diffusers.data import load_slices

    model = _stub_model_folder(tmp_path / "model", demo_root)
    split = load_slices(demo_root, split="patient", val_fraction=0.5, seed=0)
    record = json.loads((model / "training_data.json").read_text())
    record.update(train=split.train.summary(), validation={**split.val.summary(), "images": len(split.val) + 1})
    (model / "training_data.json").write_text(json.dumps(record))
    settings = dict(num_samples=2, steps=2, seed=0, feature_epochs=1, tstr_epochs=1, diversity_pairs=2, kid_subsets=2,
                    feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                    fd_resamples=0, umap=False, render_card=False, progress=False, device="cpu")
    with pytest.raises(E.EvaluationError, match=r"other training / held-out sets than the ones .* recorded .* "
                                                r"--out another folder to measure on this data anyway"):
        E.evaluate_model(model, pipe=_StubPipe(), **settings)
    assert not (model / "evaluation").exists()
    other = tmp_path / "on-this-data"
    E.evaluate_model(model, out=other, pipe=_StubPipe(), **settings)
    report = (other / "report.md").read_text()
    assert "the split differs from the one recorded" in report
    assert not (model / "evaluation").exists()
    # --fd-resamples 0: no ranges, so none is pointed at (an evaluate review, 2026-12-06)
    assert "near the floor (no ranges: --fd-resamples 0)" in report and "its range holds" not in report


def test_records_from_before_the_patient_hash_still_match_their_unchanged_data(demo_root, tmp_path):
    """Split summaries recorded before 2026-12-02 lack patients_sha256: compared whole they never matched, so such
    a model's evaluation into its own folder was refused. Compared on what they hold, they match; a count that
    differs still does not."""
    from adni_diffusers.data import load_slices

    model = _stub_model_folder(tmp_path / "model", demo_root)
    record = json.loads((model / "training_data.json").read_text())
    split = load_slices(demo_root, split="patient", val_fraction=record.get("val_fraction", 0.5), seed=0)
    old = {name: {k: v for k, v in part.summary().items() if k != "patients_sha256"}
           for name, part in (("train", split.train), ("validation", split.val))}
    (model / "training_data.json").write_text(json.dumps({**record, **old}))
    _, rec = E.load_evaluation_data(model)
    assert rec["matches_training"] is True
    old["validation"]["images"] += 1
    (model / "training_data.json").write_text(json.dumps({**record, **old}))
    assert E.load_evaluation_data(model)[1]["matches_training"] is False


def test_a_feature_cache_or_out_inside_the_data_folder_is_refused(demo_root, tmp_path):
    """`--feature-cache data/fnet` left the net's files in the data folder, and every later read of it failed; an
    --out inside a --data-dir that the model's records do not name was not caught by the recorded folder's check."""
    data = Path(shutil.copytree(demo_root, tmp_path / "AD_NC"))
    model = _stub_model_folder(tmp_path / "model", data)
    settings = dict(num_samples=2, steps=2, seed=0, render_card=False, progress=False, device="cpu")
    for flag, kwargs in (("--feature-cache", {"feature_cache": data / "fnet", "out": tmp_path / "e1"}),
                         ("--out", {"out": data / "train" / "evaluation"})):
        with pytest.raises(E.EvaluationError, match=rf"{flag} {re.escape(str(data))}.*: inside the data folder"):
            E.evaluate_model(model, data, pipe=_StubPipe(), **settings, **kwargs)
    assert not (data / "fnet").exists() and not (data / "train" / "evaluation").exists()


def test_a_refused_evaluation_leaves_no_empty_out_folder(tiny_ldm, tmp_path):
    """--out was made before the data was checked: a refused run (one class of the model's two) left it empty."""
    from PIL import Image

    one_class = tmp_path / "one-class"
    for i in range(2):
        (one_class / "train" / "AD").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((240, 256), 60 + i, np.uint8)).save(one_class / "train" / "AD" / f"p{i}_80.jpeg")
    out = tmp_path / "never-made"
    with pytest.raises(E.EvaluationError, match=r"class folders \['AD'\] differ from the model's class names"):
        E.evaluate_model(tiny_ldm, one_class, num_samples=2, out=out, device="cpu", render_card=False)
    assert not out.exists()


def test_memorisation_share_ranges_hold_chance_and_not_copies():
    """The threshold (held-out p5) of the memorisation share is set by few patients: for a generator that copies
    nothing the share ranged 1% to 27% over draws of held-out patients. Its interval resamples those patients: for
    a generator as new as held-out slices the ranges are wide and mostly hold 5%; a copying one's is far above."""
    held_the_floor, widths = 0, []
    groups, gen_groups = torch.tensor([i % 2 for i in range(10) for _ in range(20)]), torch.arange(200) % 2
    patients = [f"p{i}" for i in range(10) for _ in range(20)]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        held = np.repeat(rng.normal(10, 1.5, 10), 20) + rng.normal(0, 0.3, 200)  # patient offsets: clustered
        new = np.repeat(rng.normal(10, 1.5, 100), 2) + rng.normal(0, 0.3, 200)  # new patients, as samples should be
        for generated in (new, np.zeros(200)):
            mem = {"percentile": 5.0}
            for space in ("features", "pixels"):
                mem[space] = {"generated_distance": generated.tolist(), "heldout_distance": held.tolist(),
                              "closer_than_heldout_percentile": float((generated < np.percentile(held, 5)).mean())}
            iv = E.memorisation_intervals(mem, held_groups=groups, held_patients=patients, gen_groups=gen_groups,
                                          seed=0, resamples=200)
            low, high = iv["features"]
            assert iv["pixels"] == iv["features"] and low <= mem["features"]["closer_than_heldout_percentile"] <= high
            if generated is new:
                held_the_floor += low <= 0.05 <= high
                widths.append(high - low)
            else:
                assert low == high == 1.0  # every sample a copy
    assert held_the_floor >= 14 and np.mean(widths) > 0.1  # 16 of 20, and 0.3 wide on average, when written


def test_ranges_of_a_class_with_one_held_out_patient_say_what_they_leave_out():
    """PatientBootstrap resamples patients within each class: a class of one held-out patient redraws the same
    slices every time, so its range has no patient-to-patient chance. The record and the text say so."""
    g = torch.Generator().manual_seed(0)
    held_groups = torch.tensor([0] * 6 + [1] * 6)
    patients = ["a1"] * 6 + ["n1"] * 3 + ["n2"] * 3
    draw = E.PatientBootstrap(held_groups, patients, torch.tensor([0] * 4 + [1] * 4), seed=0)
    assert all(sorted(draw.held())[:6] == list(range(6)) for _ in range(5))  # class 0: always its one patient
    iv = E.fd_intervals(held_feats=torch.randn(12, 3, generator=g), held_groups=held_groups, held_patients=patients,
                        gen_feats=torch.randn(8, 3, generator=g), gen_groups=torch.tensor([0] * 4 + [1] * 4),
                        train_feats=torch.randn(12, 3, generator=g), train_groups=held_groups, counts={0: 4, 1: 4},
                        seed=0, measured=(1.0, 1.0), resamples=5)
    assert iv["groups_of_one_patient"] == [0]
    text = E.one_patient_text(iv, ["AD", "NC"])
    assert text.startswith("The held-out images of AD are of one patient: the ranges hold no "
                           "patient-to-patient chance there")
    # the patients counted are those of the images measured (--num-samples of them): the advice names both ways
    assert "a larger --num-samples (where more patients are held out) or more held-out patients" in text
    assert E.one_patient_text({"groups_of_one_patient": [0]}, ["all"]).startswith(
        "The held-out images are of one patient")


def test_the_floor_is_real_training_slices_against_the_same_held_out_set(stub_evaluated):
    """realism["floor"]: the seeded random TRAINING subset (N per class) against the same held-out subset as the
    samples -- recomputed here from the cached feature net; not the samples again. Precision and recall take
    both sets' patients (radii reaching other patients: a patient's own slices made the floor's recall low)."""
    from adni_diffusers.features import load_feature_net

    from adni_diffusers.features import set_aside_floor_patients

    result, model, _ = stub_evaluated
    data, _ = E.load_evaluation_data(model)
    net = load_feature_net(result["feature_net"]["path"])
    counts = {0: 4, 1: 4}
    held_idx = E.subsample(data.val.labels, counts, 0)
    net_train, floor_rows = set_aside_floor_patients(data.train, data.val)  # patients the net did not train on
    assert net.meta["report"]["trained_on"] == net_train.summary()
    assert not {data.train.patients[i] for i in floor_rows.tolist()} & set(net_train.patients)
    train_idx = floor_rows[E.subsample(data.train.labels[floor_rows], counts, 1)]
    expected = E.compare_features(net.features(data.val.pixels)[held_idx], net.features(data.train.pixels)[train_idx],
                                  kid_subsets=3, seed=0,
                                  reference_patients=[data.val.patients[i] for i in held_idx.tolist()],
                                  candidate_patients=[data.train.patients[i] for i in train_idx.tolist()])
    assert result["settings"]["pr_radii"] == E.PR_RADII
    floor = result["realism"]["floor"]
    assert floor["fd"] == pytest.approx(expected["fd"], rel=1e-5, abs=1e-8)
    assert floor["precision"] == expected["precision"] and floor["recall"] == expected["recall"]
    assert floor["fd"] != result["realism"]["generated"]["fd"]


def test_real_diversity_pairs_are_told_the_held_out_patients(stub_evaluated):
    """Real diversity "never pairs two slices of one patient": the held-out call gets the patient of every row
    (the generated call none: every sample is its own)."""
    result, model, calls = stub_evaluated
    data, _ = E.load_evaluation_data(model)
    held_idx = E.subsample(data.val.labels, {0: 4, 1: 4}, 0)
    generated, real = calls["diversity"][0], calls["diversity"][1]
    assert generated.get("patients") is None
    assert real["patients"] == [data.val.patients[i] for i in held_idx.tolist()]


def test_the_vq_ceilings_class_accuracy_is_on_held_out_round_trips(stub_evaluated):
    """The ceiling's class accuracy stands beside the accuracy on held-out slices, so it is measured on held-out
    slices after the round trip: on the floor's training slices it was the feature net's accuracy on its own
    training images. The stub's round trip is the identity: the net sees exactly the held-out slices."""
    result, model, calls = stub_evaluated
    data, _ = E.load_evaluation_data(model)
    main = [args for args in calls["class_fidelity"] if len(args[1]) != 4]  # the ablation rows score 2 + 2 samples
    assert len(main) == 2  # the samples and the ceiling
    assert any(torch.equal(images, data.val.pixels) and torch.equal(labels, data.val.labels)
               for _, images, labels, *_ in main)
    vq = result["class_fidelity"]["vq_ceiling"]
    assert vq["images"] == len(data.val) and vq["per_class"] == result["class_fidelity"]["real_heldout"][
        "accuracy_per_class"]


def test_fds_of_fewer_images_than_feature_dimensions_are_flagged_per_class_and_in_the_ablations(stub_evaluated,
                                                                                               tmp_path):
    """The stub's feature net has 8 dimensions; the summary's FD compares 8 images per set (4 per class of two:
    no note), but each class's FD compares 4 and each ablation row 2 + 2: those tables are singular too and
    must say so (as --num-samples 128 per class of two passed the summary's 256 and flagged no class)."""
    result, _, _ = stub_evaluated
    res = {k: v for k, v in result.items() if k != "card"}
    assert res["realism"]["generated"]["feature_dims"] == 8 and E.fd_rank_note(res["realism"]["generated"]) is None
    report = E.write_report(res, tmp_path).read_text()
    per_class = report.split("## Realism per class")[1].split("## Diversity")[0]
    assert "Per class: FD compares 4 images per set in 8 feature dimensions" in per_class
    ablations = report.split("## Ablations")[1]
    assert "FD compares 4 images per set in 8 feature dimensions" in ablations
    assert "--ablation-samples 4 or more per class (8 in all)" in ablations  # 2 + 2 now: 4 of each make 8
    assert "FD compares 8 images" not in report
    assert E.per_class_fd_note(res["realism"]["per_class"]).startswith("Per class: FD compares 4 images")


def test_the_ablation_row_of_the_main_setting_reuses_the_main_runs_images_of_every_class(stub_evaluated):
    """The main setting's ablation row reuses the main run's first M samples PER CLASS (same seeds): with a stub
    whose images depend on the seeds only, it must measure exactly what every freshly sampled row measures."""
    result, _, _ = stub_evaluated
    rows = result["ablations"]["rows"]
    off = next(r for r in rows if r["group"] == "refinement" and r["setting"] == "off")
    assert off["same_run_as"] is None and off["seconds"] > 0
    for r in rows:
        assert r["fd"] == pytest.approx(off["fd"], rel=1e-5, abs=1e-8), r["label"]
        assert r["class_accuracy"] == off["class_accuracy"], r["label"]


def test_ablation_samples_beyond_num_samples_are_sampled_not_cut(demo_root, tmp_path, caplog):
    """--ablation-samples was cut to --num-samples without a word (every row measured 2 images per class where 4
    were asked for and the records said 4); and the report spoke of 8 closest samples beside a picture of 4."""
    model = tmp_path / "model"
    _stub_model_folder(model, demo_root)
    result = E.evaluate_model(model, num_samples=2, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                              feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                              diversity_pairs=2, kid_subsets=3, ablations=True, ablation_samples=4,
                              ablation_step_overrides={"ddpm": 6, "ddim": 3, "dpm++": 3, "unipc": 2},
                              fd_resamples=FEW_RESAMPLES, umap=False, render_card=False, progress=False,
                              device="cpu", pipe=_StubPipe())
    assert result["ablations"]["images_per_class"] == {"AD": 4, "NC": 4}
    rows = result["ablations"]["rows"]
    off = next(r for r in rows if r["group"] == "refinement" and r["setting"] == "off")
    for r in rows:  # the stub's images depend on the seeds only: the main setting's row sampled 4 too
        assert r["fd"] == pytest.approx(off["fd"], rel=1e-5, abs=1e-8), r["label"]
    # the main setting is known without the main run's images (too few to reuse), and every row's paired gain
    # over it is exactly 0: the same images in every resample
    main = next(r for r in rows if r["label"] == result["ablations"]["main_setting"])
    assert (main["scheduler"], main["steps"], main["guidance"], main["refine_repeats"]) == ("dpm++", 3, 2.0, 0)
    assert all(r["fd_gain_vs_main_interval"] in (None, [0.0, 0.0]) for r in rows)
    assert sum(r["fd_gain_vs_main_interval"] == [0.0, 0.0] for r in rows) >= 5
    assert "The 4 samples nearest to the training set" in (model / "evaluation" / "report.md").read_text()
    with caplog.at_level("WARNING", logger="adni_diffusers.evaluate"):  # and a cut --num-samples is said
        E.evaluate_model(model, num_samples=1000, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                         feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                         diversity_pairs=2, kid_subsets=3, umap=False, render_card=False, progress=False,
                         device="cpu", pipe=_StubPipe())
    assert "images per class, not --num-samples 1000" in caplog.text


def test_the_ablation_legend_covers_no_bar(tmp_path, monkeypatch):
    """The precision / recall legend sat in the lower right corner, over the last row's precision bar where it
    meets its floor (the shipped example's w=5 row). It stands below the axes now."""
    from adni_diffusers import evaluate as ev

    covered = []

    def check(fig, path, **kw):
        renderer = fig.canvas.get_renderer()
        legend = fig.axes[1].get_legend().get_window_extent(renderer)
        covered.extend(bar.get_width() for bar in fig.axes[1].patches
                       if bar.get_window_extent(renderer).overlaps(legend))
        return Path(path)

    monkeypatch.setattr(ev, "save_figure", check)
    metrics = json.loads((Path(__file__).parents[1] / "docs" / "example_model_card" / "evaluation" /
                          "metrics.json").read_text())["ablations"]
    ev.plot_ablations(metrics["rows"], metrics["floor"], tmp_path / "ablations.png")
    assert covered == []


def test_the_feature_net_trains_on_the_models_training_split_only(tiny_ldm, tmp_path, monkeypatch):
    """Every realism number is measured in the feature net's space: trained on held-out patients, the net would have
    seen the very slices the samples are compared with. It gets the training split less the floor's patients (whose
    slices must be new to it, as the samples are); the held-out split only to be measured. (A spy stops the run
    once the net is asked for.)"""
    from adni_diffusers import features

    class Seen(Exception):
        pass

    seen = {}

    def spy(cache_dir, train, val=None, **settings):
        seen.update(train=train, val=val)
        raise Seen

    monkeypatch.setattr(features, "get_or_train_feature_net", spy)
    with pytest.raises(Seen):
        E.evaluate_model(tiny_ldm, num_samples=2, out=tmp_path / "eval", progress=False)
    data, _ = E.load_evaluation_data(tiny_ldm)
    assert seen["val"].paths == data.val.paths and not set(seen["train"].patients) & set(data.val.patients)
    assert set(seen["train"].paths) < set(data.train.paths)
    # whole patients kept out: none of a floor patient's slices is in the net's training
    floor_patients = set(data.train.patients) - set(seen["train"].patients)
    assert floor_patients and [p for p in data.train.paths if p not in seen["train"].paths] == \
        [path for path, patient in zip(data.train.paths, data.train.patients) if patient in floor_patients]


def test_the_split_is_redrawn_with_the_models_val_fraction(tmp_path):
    """--val_fraction decides which patients were held out: evaluate must redraw with the model's, not 0.1."""
    from adni_diffusers.evaluate import read_training_record

    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data", "split": "patient"}))
    (tmp_path / "training_args.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.3}))
    assert read_training_record(tmp_path)["val_fraction"] == 0.3


def test_an_evaluation_on_other_data_is_not_called_demo(demo_root, tmp_path):
    """metrics.json must say not demo for a user's data folder, or `push` would upload closest_pairs.png and the
    reconstructions of (real) held-out slices."""
    import shutil

    real = Path(shutil.copytree(demo_root, tmp_path / "real"))
    (real / "demo_settings.json").unlink()
    model = tmp_path / "model"
    _stub_model_folder(model, demo_root)
    result = E.evaluate_model(model, real, num_samples=4, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                              feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                              diversity_pairs=4, kid_subsets=3, ablations=False, umap=False, render_card=False,
                              progress=False, device="cpu", pipe=_StubPipe())
    assert result["data"]["data_source_is_demo"] is False
    assert json.loads((model / "evaluation" / "metrics.json").read_text())["data"]["data_source_is_demo"] is False


def test_per_class_realism_compares_each_class_with_its_own_held_out_images():
    g = torch.Generator().manual_seed(0)
    ad, nc = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g) + 5.0
    labels = torch.tensor([0] * 12 + [1] * 12)
    held = (torch.cat([ad, nc]), labels)
    # generated AD are the held-out AD; generated NC sit elsewhere; a class with 2 held-out images is left out
    generated = (torch.cat([ad.clone(), nc + 3.0]), labels)
    held = (torch.cat([held[0], nc[:2]]), torch.cat([labels, torch.tensor([2, 2])]))
    out = E.per_class_realism(["AD", "NC", "MCI"], held=held, generated=generated, train=generated,
                              vq_round_trip=generated, kid_subsets=2, seed=0)
    assert set(out) == {"AD", "NC"}
    assert out["AD"]["generated"]["reference_images"] == 12 and out["AD"]["generated"]["fd"] == pytest.approx(0, abs=1e-3)
    assert out["NC"]["generated"]["fd"] > 5  # pooled reference would put AD's own FD far from 0 too
    assert out["AD"]["floor"] == out["AD"]["generated"] and set(out["NC"]) == {"generated", "floor", "vq_ceiling"}


def test_an_evaluation_cut_short_in_its_ablations_keeps_its_numbers(stub_evaluated, tmp_path, monkeypatch):
    """Everything stayed in memory until the very end: Ctrl-C (or a crash) in the ablation rows, which can take
    hours (DDPM-1000), lost the finished measurement. metrics.json and report.md are written before them, marked
    incomplete, and a closest_pairs.png without its record is not pushed."""
    from adni_diffusers.hub import shows_real_slices

    result, model, _ = stub_evaluated

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "run_ablations", cut_short)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        E.evaluate_model(model, out=out, num_samples=4, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                         feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                         diversity_pairs=4, kid_subsets=3, ablations=True, ablation_samples=2, umap=False,
                         render_card=False, progress=False, device="cpu", pipe=_StubPipe())
    partial = json.loads((out / "metrics.json").read_text())
    assert partial["complete"] is False and partial["ablations"] is None
    assert partial["realism"]["generated"]["fd"] == pytest.approx(result["realism"]["generated"]["fd"])
    assert "**Incomplete:**" in (out / "report.md").read_text() and result["complete"] is True
    (out / "metrics.json").unlink()  # cut short before any record: its picture of training slices stays local
    assert shows_real_slices(out, "closest_pairs.png", demo=True)
    E.check_earlier_outputs(out, model)  # its own leftovers (the marker says so): the same command runs again


def test_an_out_folder_with_files_no_evaluation_made_is_refused(model_copy, tmp_path):
    """--out removed every file named like an output (report.md, umap.png, samples_*.png) without asking: another
    folder of the user's own lost them. Refused unless an evaluation's metrics.json is beside them."""
    out = tmp_path / "figures"
    out.mkdir()
    (out / "report.md").write_text("# my paper's notes\n")
    (out / "samples_figure3.png").write_bytes(b"png")
    with pytest.raises(E.EvaluationError, match=r"--out .*figures: holds report.md, samples_figure3.png, which this "
                                                r"evaluation would replace, and no evaluation's metrics.json"):
        E.check_earlier_outputs(out, model_copy)
    (out / "metrics.json").write_text(json.dumps({"realism": {}, "settings": {}, "feature_net": {}}))
    E.check_earlier_outputs(out, model_copy)  # an earlier evaluation's: replaced
    E.check_earlier_outputs(model_copy / "evaluation", model_copy)  # the model's own evaluation folder


def test_a_rerun_cut_short_leaves_no_card_showing_the_removed_numbers(evaluated, model_copy, tmp_path, monkeypatch):
    """The earlier evaluation goes once the feature net is ready (since 2026-12-08: --compare-with checks the net
    first, and may compare with that very evaluation), before any sampling; a rerun that then fails must re-render
    the card at once, or it goes on showing numbers whose metrics.json is gone (and a push uploads that card). A run
    cut short before, in the feature net's training, leaves the earlier evaluation whole, and the card with it."""
    model = tmp_path / "ldm"
    shutil.copytree(model_copy, model)
    card = model / "README.md"
    card.write_text(render_model_card(model), encoding="utf-8")
    assert "From `evaluation/metrics.json`" in card.read_text(encoding="utf-8")
    earlier = sorted(p.name for p in (model / "evaluation").iterdir())

    def cut_short(*args, **kwargs):
        raise RuntimeError("the job's time limit")

    with monkeypatch.context() as mp:
        mp.setattr(Fe, "get_or_train_feature_net", cut_short)
        with pytest.raises(RuntimeError, match="time limit"):
            E.evaluate_model(model, num_samples=2, steps=2, device="cpu", progress=False)
    assert sorted(p.name for p in (model / "evaluation").iterdir()) == earlier
    assert "From `evaluation/metrics.json`" in card.read_text(encoding="utf-8")
    monkeypatch.setattr(E, "sample_images", cut_short)
    with pytest.raises(RuntimeError, match="time limit"):
        E.evaluate_model(model, num_samples=2, steps=2, device="cpu", progress=False)
    assert not (model / "evaluation" / "metrics.json").exists()
    assert "Not measured yet" in card.read_text(encoding="utf-8")


# --- mutation audit 2026-12-05 (evaluate orchestration)


def test_the_held_out_set_is_redrawn_with_the_recorded_split_seed_fraction_and_preprocessing(demo_root, tmp_path):
    """load_evaluation_data redraws the split with the record's split seed (not --seed, not 0), val_fraction and
    preprocessing: the existing tests check read_training_record only, and the tiny model was trained with the
    defaults, so a load that dropped any of them went unnoticed."""
    from adni_diffusers.data import load_slices

    model = tmp_path / "model"
    model.mkdir()
    (model / "training_data.json").write_text(json.dumps({
        "root": str(demo_root), "split": "patient", "preprocess": "resize", "class_names": ["AD", "NC"],
        "patient_ids": "subject", "subjects_named_both_ways": 0}))
    (model / "training_args.json").write_text(json.dumps({"seed": 9, "split_seed": 3, "val_fraction": 0.5}))
    data, _ = E.load_evaluation_data(model)
    expected = load_slices(demo_root, split="patient", val_fraction=0.5, seed=3, preprocess="resize")
    assert data.val.paths == expected.val.paths and data.train.paths == expected.train.paths
    assert torch.equal(data.val.pixels, expected.val.pixels)
    # each of the three matters on this folder: the defaults (seed 0, 0.1, pad) give another split / other pixels
    assert load_slices(demo_root, split="patient", val_fraction=0.5, seed=0).val.paths != data.val.paths
    assert len(load_slices(demo_root, split="patient", val_fraction=0.1, seed=3).val) != len(data.val)
    assert not torch.equal(load_slices(demo_root, split="patient", val_fraction=0.5, seed=3).val.pixels,
                           data.val.pixels)


def test_a_record_from_before_the_subject_rule_loads_patients_by_file_name(tmp_path):
    """A record without patient_ids (training before 2026-12-03) split by the file name's patient part as it is:
    two scans of one ADNI subject were two patients then, and load_evaluation_data must redraw exactly that split."""
    from PIL import Image

    from adni_diffusers.data import load_slices

    root = tmp_path / "data"
    for c, cls in enumerate(("AD", "NC")):
        (root / cls).mkdir(parents=True)
        for subject in range(3):
            for scan in ("bl", "m06"):
                name = f"ADNI_00{c}_S_000{subject}_MR_{scan}_80.png"
                Image.new("L", (256, 256), 40 * subject + (10 if scan == "bl" else 0)).save(root / cls / name)
    model = tmp_path / "model"
    model.mkdir()
    (model / "training_data.json").write_text(json.dumps({"root": str(root), "split": "patient"}))
    (model / "training_args.json").write_text(json.dumps({"seed": 0, "val_fraction": 0.3}))
    data, record = E.load_evaluation_data(model)
    assert record["patient_ids"] == "file"
    expected = load_slices(root, split="patient", val_fraction=0.3, seed=0, patient_ids="file")
    assert data.val.patients == expected.val.patients and data.val.paths == expected.val.paths
    assert all(p.startswith("ADNI_") for p in data.train.patients + data.val.patients)  # the names as they are


def test_the_training_record_falls_back_on_training_args_and_documented_defaults(tmp_path):
    """Without training_data.json, the data folder and split come from training_args.json; without either record,
    the defaults the warning names: --split patient, --val_fraction 0.1, --seed 0, --preprocess pad. Where both
    records give the preprocessing, training_data.json's (what the data pass used) wins."""
    record = E.read_training_record(tmp_path)
    assert (record["root"], record["split"], record["val_fraction"], record["seed"], record["preprocess"]) == \
        (None, "patient", 0.1, 0, "pad")
    (tmp_path / "training_args.json").write_text(json.dumps({"train_data_dir": "/data/AD_NC", "split": "given",
                                                              "val_fraction": 0.25, "seed": 4,
                                                              "preprocess": "pad"}))
    record = E.read_training_record(tmp_path)
    assert (record["root"], record["split"], record["val_fraction"], record["seed"]) == \
        ("/data/AD_NC", "given", 0.25, 4)
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/moved/AD_NC", "preprocess": "resize"}))
    record = E.read_training_record(tmp_path)
    assert record["root"] == "/moved/AD_NC" and record["preprocess"] == "resize" and record["split"] == "given"


def test_training_data_json_alone_says_what_drew_the_held_out_patients(tmp_path, caplog):
    """A model folder with training_data.json but not training_args.json (copied by hand): since 2026-12-05 the
    data record holds the split's seed and fraction, and evaluate redraws the same patients from it; an older
    record without them gets a warning that the defaults are assumed (they were, silently)."""
    import logging

    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data/AD_NC", "split": "patient"}))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        record = E.read_training_record(tmp_path)
    assert (record["val_fraction"], record["seed"]) == (0.1, 0)
    assert "does not say what drew the held-out patients" in caplog.text
    caplog.clear()
    (tmp_path / "training_data.json").write_text(json.dumps({"root": "/data/AD_NC", "split": "patient",
                                                              "val_fraction": 0.2, "split_seed": 7}))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers"):
        record = E.read_training_record(tmp_path)
    assert (record["val_fraction"], record["seed"]) == (0.2, 7) and caplog.text == ""


def test_a_recorded_data_folder_that_is_gone_is_refused_naming_data_dir(tmp_path):
    (tmp_path / "training_data.json").write_text(json.dumps({"root": str(tmp_path / "gone"), "split": "patient"}))
    with pytest.raises(E.EvaluationError, match=r"training data .*gone \(from training_data.json\) is not there; "
                                                r"pass --data-dir"):
        E.load_evaluation_data(tmp_path)


def test_a_data_folder_of_other_classes_is_refused_before_its_slices_are_decoded(demo_root, tmp_path, monkeypatch):
    """evaluate on a folder of other classes decoded every slice (minutes on ADNI) before refusing it."""
    import adni_diffusers.data as D

    model = _stub_model_folder(tmp_path / "model", demo_root)

    def decode_all(*args, **kwargs):
        raise AssertionError("decoded before the classes were checked")

    monkeypatch.setattr(D, "decode_all", decode_all)
    with pytest.raises(E.EvaluationError, match=r"class folders \['AD', 'NC'\] differ from the model's class names "
                                                r"\['AD', 'MCI', 'NC'\]"):
        E.load_evaluation_data(model, model_class_names=["AD", "MCI", "NC"])


def test_the_models_own_class_names_decide_and_a_changed_held_out_split_is_flagged(demo_root, tmp_path, caplog):
    """The model's class names (model_index.json) are what the data must have, whatever training_data.json says;
    and a held-out split that differs from the recorded one is flagged as a changed training split is."""
    import logging

    from adni_diffusers.data import load_slices

    model = _stub_model_folder(tmp_path / "model", demo_root)
    with pytest.raises(E.EvaluationError, match=r"differ from the model's class names \['AD', 'MCI'\]"):
        E.load_evaluation_data(model, model_class_names=["AD", "MCI"])
    split = load_slices(demo_root, split="patient", val_fraction=0.5, seed=0)
    record = json.loads((model / "training_data.json").read_text())
    record.update(train=split.train.summary(), validation={**split.val.summary(), "images": len(split.val) + 1})
    (model / "training_data.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="adni_diffusers.evaluate"):
        _, rec = E.load_evaluation_data(model, model_class_names=["AD", "NC"])
    assert rec["matches_training"] is False and "the validation split differs" in caplog.text
    assert "the train split differs" not in caplog.text


def _fake_result(card="model card re-rendered: x"):
    numbers = {"fd": 1.0, "precision": 0.5, "recall": 0.5}
    return {"realism": {"generated": numbers, "floor": numbers, "vq_ceiling": numbers},
            "feature_net": {"cached": True, "path": "net"}, "card": card}


def test_the_cli_prints_fd_with_its_interval(monkeypatch, capsys, tmp_path):
    """The command's last lines are what a user reads first: FD and its floor with their ranges, and over how many
    held-out patients."""
    result = _fake_result()
    result["realism"]["fd_intervals"] = {"level": 0.95, "held_out_patients": 10, "fd": [18.68, 37.99],
                                         "floor_fd": [0.2278, 7.174]}
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: result)
    assert cli.main(["evaluate", "--model", str(tmp_path / "ldm")]) == 0
    said = capsys.readouterr().out
    assert f"{FD_NAME}: 1 (18.68 to 37.99) (floor, real train vs held-out: 1 (0.2278 to 7.174); VQ ceiling" in said
    assert "FD's ranges: 95% intervals over the 10 held-out patients" in said


def test_the_cli_prints_a_floor_fd_without_a_range(monkeypatch, capsys, tmp_path):
    """One held-out patient per class (the quick demo): the floor FD's range is None. The summary had crashed
    with "'NoneType' object is not subscriptable" after every file was written, and the command exited 1."""
    result = _fake_result()
    result["realism"]["fd_intervals"] = {"level": 0.95, "held_out_patients": 2, "fd": [18.68, 37.99],
                                         "floor_fd": None, "floor_fd_unvaried": True, "groups_of_one_patient": [0, 1]}
    result["realism"]["images_per_class"] = {"AD": 4, "NC": 4}
    monkeypatch.setattr(E, "evaluate_model", lambda *a, **k: result)
    assert cli.main(["evaluate", "--model", str(tmp_path / "ldm")]) == 0
    said = capsys.readouterr().out
    assert f"{FD_NAME}: 1 (18.68 to 37.99) (floor, real train vs held-out: 1; VQ ceiling" in said
    assert "of AD and NC are of one patient each" in said


def test_the_cli_hands_every_flag_and_its_documented_default_to_evaluate_model(tmp_path, monkeypatch, capsys):
    """`main` maps the command line onto evaluate_model: each flag to its own argument (a flag dropped or two swapped
    ran with the default, without a word), and the defaults the help texts name."""
    seen = []

    def capture(*args, **kwargs):
        seen.append((args, kwargs))
        return _fake_result()

    monkeypatch.setattr(E, "evaluate_model", capture)
    model, data, cache = tmp_path / "ldm", tmp_path / "AD_NC", tmp_path / "cache"
    assert cli.main(["evaluate", "--model", str(model), "--data-dir", str(data), "--num-samples", "7",
                     "--out", str(tmp_path / "o"), "--scheduler", "ddim", "--steps", "4", "--guidance", "3",
                     "--refine-steps", "2", "--refine-repeats", "3", "--seed", "5", "--batch-size", "6",
                     "--device", "cpu", "--dtype", "bfloat16", "--feature-cache", str(cache), "--feature-epochs", "2",
                     "--tstr-epochs", "3", "--diversity-pairs", "9", "--kid-subsets", "11", "--no-umap",
                     "--fd-resamples", "13", "--feature-net-seed", "14", "--feature-nets", "3", "--ablations", "--ablation-samples", "12", "--no-card",
                     "--compare-with", str(tmp_path / "other")]) == 0
    args, kw = seen[-1]
    assert args == (str(model), str(data), 7, str(tmp_path / "o"))
    assert kw == dict(scheduler="ddim", steps=4, guidance=3.0, refine_steps=2, refine_repeats=3, seed=5, batch_size=6,
                      device="cpu", dtype="bfloat16", feature_cache=str(cache), feature_epochs=2, tstr_epochs=3,
                      diversity_pairs=9, kid_subsets=11, fd_resamples=13, feature_net_seed=14, feature_nets=3,
                      ablations=True,
                      ablation_samples=12, umap=False, render_card=False, compare_with=str(tmp_path / "other"))
    said = capsys.readouterr().out
    assert f"report: {tmp_path / 'o' / 'report.md'}" in said and f"{FD_NAME}: 1 (floor" in said
    assert cli.main(["evaluate", "--model", str(model)]) == 0
    args, kw = seen[-1]
    assert args == (str(model), None, 100, None)
    assert kw == dict(scheduler="dpm++", steps=None, guidance=None, refine_steps=0, refine_repeats=0, seed=0,
                      batch_size=None, device=None, dtype="float32", feature_cache=None, feature_epochs=5,
                      tstr_epochs=10, diversity_pairs=None, kid_subsets=100, fd_resamples=200, feature_net_seed=0,
                      feature_nets=1, ablations=False,
                      ablation_samples=E.DEFAULT_ABLATION_SAMPLES, umap=True, render_card=True, compare_with=None)
    assert f"report: {model / 'evaluation' / 'report.md'}" in capsys.readouterr().out


def test_the_card_is_re_rendered_only_when_it_reads_this_evaluation_and_is_a_generated_one(tmp_path):
    """_rerender_card: a card reads <model>/evaluation/metrics.json, so another --out leaves it alone; a README
    the user wrote (no generated-card marker) is never overwritten."""
    model = tmp_path / "model"
    model.mkdir()
    said = E._rerender_card(model, tmp_path / "elsewhere")
    assert said.startswith("model card not re-rendered: it reads") and not (model / "README.md").exists()
    (model / "README.md").write_text("# my own notes\n")
    said = E._rerender_card(model, model / "evaluation")
    assert "is not a generated card (left as it is)" in said
    assert (model / "README.md").read_text() == "# my own notes\n"


def test_an_out_folder_with_another_models_evaluation_is_refused(tmp_path):
    """A researcher evaluating model A, then B, into one --out lost A's numbers without a word (B's replaced them).
    The same model may replace its own, also from its weights copied elsewhere (the same sha256)."""
    def saved_model(name: str, weights: bytes) -> Path:
        folder = tmp_path / name
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
        return folder

    model_a, model_b = saved_model("ldmA", b"a"), saved_model("ldmB", b"b")
    out = tmp_path / "results"
    out.mkdir()
    (out / "report.md").write_text("# A's\n")
    record = {"realism": {}, "settings": {}, "feature_net": {},
              "model": {"path": str(model_a), "model_sha256": model_fingerprint(str(model_a))}}
    (out / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(E.EvaluationError, match=r"--out .*results: holds the evaluation of another model "
                                                r"\(.*ldmA\), which this one would replace"):
        E.check_earlier_outputs(out, model_b)
    E.check_earlier_outputs(out, model_a)  # its own evaluation: replaced
    shutil.copytree(model_a, tmp_path / "copy_of_A")
    E.check_earlier_outputs(out, tmp_path / "copy_of_A")  # the same weights elsewhere


def test_weights_checked_against_an_out_folders_evaluation_are_hashed_once(demo_root, tmp_path, monkeypatch):
    """--out holding the evaluation of the same weights saved elsewhere: the check hashed the weights, and the run
    then hashed them again for metrics.json (a base model's weights: about 400 MB read twice)."""
    from adni_diffusers import generate

    model = _stub_model_folder(tmp_path / "model", demo_root)
    settings = dict(num_samples=2, steps=2, seed=0, feature_epochs=1, tstr_epochs=1, diversity_pairs=2, kid_subsets=2,
                    feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                    fd_resamples=0, umap=False, render_card=False, progress=False, device="cpu")
    out = tmp_path / "results"
    E.evaluate_model(model, out=out, pipe=_StubPipe(), **settings)
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    hashed = []
    fingerprint = generate.model_fingerprint
    monkeypatch.setattr(generate, "model_fingerprint", lambda m: hashed.append(m) or fingerprint(m))
    result = E.evaluate_model(copy, out=out, pipe=_StubPipe(), **settings)
    assert hashed == [str(copy)] and result["model"]["model_sha256"] == fingerprint(str(model))


def test_the_models_own_evaluation_folder_is_always_replaced_and_a_foreign_metrics_json_protects_nothing(tmp_path):
    """check_earlier_outputs: <model>/evaluation is evaluate's own folder (a run cut short before its metrics.json
    may have left a report.md there); elsewhere a metrics.json that no evaluation wrote does not make the files
    beside it an evaluation's."""
    model = tmp_path / "model"
    (model / "evaluation").mkdir(parents=True)
    (model / "evaluation" / "report.md").write_text("# an earlier run's, cut short\n")
    E.check_earlier_outputs(model / "evaluation", model)
    out = tmp_path / "figures"
    out.mkdir()
    (out / "report.md").write_text("# mine\n")
    (out / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    with pytest.raises(E.EvaluationError, match="no evaluation's metrics.json beside them"):
        E.check_earlier_outputs(out, model)


def test_an_unknown_scheduler_is_refused_naming_the_flag(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(E.EvaluationError, match=r"--scheduler 'euler': expected one of ddpm, ddim, dpm\+\+, unipc"):
        E.evaluate_model(tmp_path, num_samples=2, scheduler="euler", out=tmp_path / "out", device="cpu",
                         progress=False, render_card=False)


class _Seen(Exception):
    pass


def test_a_conditional_model_without_class_names_is_refused(demo_root, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started for a model without class names")

    monkeypatch.setattr(Fe, "get_or_train_feature_net", no_work)
    pipe = _StubPipe()
    pipe.config = SimpleNamespace(class_names=None)
    model = _stub_model_folder(tmp_path / "model", demo_root)
    with pytest.raises(E.EvaluationError, match="a class-conditional model without class_names in model_index.json"):
        E.evaluate_model(model, num_samples=2, device="cpu", progress=False, render_card=False, pipe=pipe)


def test_the_default_step_count_is_capped_by_the_models_training_timesteps(demo_root, tmp_path, monkeypatch):
    """Without --steps, DDPM takes the model's own training timesteps (20 here), not 1000 (which it refuses)."""
    from diffusers import DDPMScheduler

    seen = {}

    def fake_net(*args, **kwargs):
        return None, {"cached": True, "path": "net", "val": {"accuracy": 0.5}}

    def sample_spy(pipe, labels, **kw):
        seen.update(kw)
        raise _Seen

    monkeypatch.setattr(Fe, "get_or_train_feature_net", fake_net)
    monkeypatch.setattr(E, "sample_images", sample_spy)
    pipe = _StubPipe()
    pipe.scheduler = DDPMScheduler(num_train_timesteps=20)
    model = _stub_model_folder(tmp_path / "model", demo_root)
    with pytest.raises(_Seen):
        E.evaluate_model(model, num_samples=2, scheduler="ddpm", device="cpu", progress=False, render_card=False,
                         pipe=pipe)
    assert seen["steps"] == 20 and seen["scheduler"] == "ddpm"


@pytest.fixture(scope="module")
def stub_seeded(demo_root, tmp_path_factory):
    """evaluate_model with the stub pipeline, --seed 5 (the split's seed is 0), the CPU defaults of the sampling batch
    and diversity pairs, and a split with fewer training than held-out images (4 vs 12 per class): --num-samples 6
    gives 4 per class to the distribution metrics. Records every `sample_images` call (labels and keywords)."""
    model = tmp_path_factory.mktemp("stub_seeded") / "model"
    _stub_model_folder(model, demo_root)
    (model / "training_args.json").write_text(json.dumps({"val_fraction": 0.75, "seed": 0}))
    calls = []
    sample = E.sample_images

    def sample_spy(pipe, labels, **kw):
        calls.append((list(labels), dict(kw)))
        return sample(pipe, labels, **kw)

    logged = []  # the run's log lines (caplog is per test)
    handler, package_logger = logging.Handler(), logging.getLogger("adni_diffusers")
    handler.emit = lambda record: logged.append(record.getMessage())
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "sample_images", sample_spy)
        result = E.evaluate_model(model, num_samples=6, steps=3, seed=5, feature_epochs=1, tstr_epochs=1,
                                  feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8,
                                                    "bn_images": 16},
                                  kid_subsets=3, ablations=True, ablation_samples=2,
                                  ablation_step_overrides={"ddpm": 6, "ddim": 3, "dpm++": 3, "unipc": 2},
                                  fd_resamples=FEW_RESAMPLES, umap=False, render_card=False, progress=False,
                                  device="cpu", pipe=_StubPipe())
    package_logger.removeHandler(handler)
    package_logger.setLevel(level)
    return result, model, calls, logged


def _setting(kw):
    return (kw["scheduler"], kw["steps"], kw["refine_steps"], kw["refine_repeats"], kw["guidance"])


def test_every_sample_is_drawn_with_the_runs_seed_and_every_ablation_setting_once(stub_seeded):
    """--seed reaches the main samples and every ablation row (the same noise per image in every row); each distinct
    setting of the table is sampled once, and the main setting not again (its row reuses the main run's images)."""
    result, _, calls, _ = stub_seeded
    (main_labels, main), *ablation = calls
    assert main_labels == [0] * 6 + [1] * 6
    assert _setting(main) == ("dpm++", 3, 0, 0, 2.0) and main["batch_size"] == 16
    assert all(kw["seed"] == 5 for _, kw in calls)
    assert all(labels == [0, 0, 1, 1] for labels, _ in ablation)
    sampled = [_setting(kw) for _, kw in ablation]
    assert len(sampled) == len(set(sampled)) and _setting(main) not in sampled
    rows = {(r["scheduler"], r["steps"], r["refine_steps"], r["refine_repeats"], r["guidance"])
            for r in result["ablations"]["rows"]}
    assert set(sampled) | {_setting(main)} == rows


def test_the_ablation_floor_and_rows_are_measured_on_the_runs_seeded_real_subsets(stub_seeded):
    """The ablation table's reals: per class, the seeded held-out (seed) and training (seed + 1) subsets, M of each;
    its main-setting row: the first M samples per class of --seed against those held-out reals. Recomputed here
    from the cached feature net and the stub's seed-only images."""
    from adni_diffusers.data import to_uint8
    from adni_diffusers.features import load_feature_net

    result, model, _, _ = stub_seeded
    data, _ = E.load_evaluation_data(model)
    net = load_feature_net(result["feature_net"]["path"])
    held = net.features(data.val.pixels)[E.subsample(data.val.labels, {0: 2, 1: 2}, 5)]
    train = net.features(data.train.pixels)[E.subsample(data.train.labels, {0: 2, 1: 2}, 6)]
    floor = E.compare_features(held, train, kid_subsets=3, seed=5)
    images = E.sample_images(_StubPipe(), [0, 0, 1, 1], steps=3, seed=5, progress=False)
    samples = E.compare_features(held, net.features(to_uint8(E.M.as_images(images))), kid_subsets=3, seed=5)
    ab = result["ablations"]
    off = next(r for r in ab["rows"] if r["group"] == "refinement" and r["setting"] == "off")
    for measured, expected in ((ab["floor"], floor), (off, samples)):
        assert measured["fd"] == pytest.approx(expected["fd"], rel=1e-5, abs=1e-8)
        assert (measured["precision"], measured["recall"]) == (expected["precision"], expected["recall"])


def test_tstr_and_trtr_train_on_as_many_images_per_class(stub_seeded):
    """With fewer training slices per class (4) than --num-samples (6), TRTR had 4 per class and TSTR all 6: the
    synthetic-trained classifier got more data. Both train on 4 per class, TSTR on the first samples of each."""
    result, _, _, _ = stub_seeded
    tstr, trtr = result["class_fidelity"]["tstr"], result["class_fidelity"]["trtr"]
    assert tstr["train_images"] == trtr["train_images"] == 8


def test_the_records_say_what_ran(stub_seeded):
    """metrics.json's settings and report.md's first lines give the run's seed, the CPU defaults it used and the
    data's own numbers; the distribution metrics use as many images per class as the smaller real split has."""
    result, model, _, logged = stub_seeded
    out = model / "evaluation"
    metrics = json.loads((out / "metrics.json").read_text())
    st = metrics["settings"]
    assert (st["seed"], st["num_samples"], st["samples_per"], st["batch_size"], st["diversity_pairs"]) == \
        (5, 6, "class", 16, 200)
    realism = metrics["realism"]
    assert realism["images_per_class"] == {"AD": 4, "NC": 4}
    # and the log says so in words (it printed "{'AD': 4, 'NC': 4} images per class")
    assert "distribution metrics use AD 4, NC 4 images per class, not --num-samples 6 (held-out / training images " \
        "available)" in logged
    assert "TSTR and TRTR train on AD 4, NC 4 images per class (the training split's slices), not --num-samples 6" \
        in logged
    assert realism["generated"]["candidate_images"] == realism["generated"]["reference_images"] == 8
    assert realism["floor"]["candidate_images"] == realism["floor"]["reference_images"] == 8
    report = (out / "report.md").read_text()
    assert "Samples: 6 per class from `dpm++` with 3 steps, guidance 2, no refinement, seed 5, on `cpu`." in report
    # this stub's training_data.json has no split summary (matches_training None): "never saw" cannot be confirmed
    assert "split `patient` with the model's settings (training recorded no split to compare with): 8 training " \
           "images of 2 patients, 24 held-out images of 6 patients (not confirmed as unseen by the model" in report
    assert result["card"] == "model card not re-rendered (disabled)" and not (model / "README.md").exists()
    assert not (out / E.RUNNING_MARKER).exists()


def test_the_reports_opening_does_not_call_another_splits_held_out_unseen(stub_seeded, tmp_path):
    """--data-dir another folder (or one changed since training) with --out elsewhere: the opening said "split
    `patient` as in training: 720 training images of 36 patients, 80 held-out images of 4 patients the model never
    saw" for a model trained on 120 images of 6 patients, right above the bold warning that they may include images
    the model saw."""
    result, _, _, _ = stub_seeded
    res = {k: v for k, v in result.items() if k != "card"}
    for matches in (False, None):
        res["data"] = {**res["data"], "matches_training": matches}
        opening = E.write_report(res, tmp_path).read_text().split("\n\n")[1]
        assert "as in training" not in opening and "never saw" not in opening, opening
        assert "not confirmed as unseen by the model" in opening
    res["data"] = {**res["data"], "matches_training": True}
    opening = E.write_report(res, tmp_path).read_text().split("\n\n")[1]
    assert "as in training" in opening and "patients the model never saw." in opening


def test_ablations_csv_holds_the_tables_rows_and_the_real_floor(stub_seeded):
    import csv

    result, model, _, _ = stub_seeded
    with open(model / "evaluation" / "ablations.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header, rows = reader.fieldnames, list(reader)
    assert header == ["group", "setting", "scheduler", "steps", "refine_steps", "refine_repeats",
                      "refine_from_timestep", "guidance", "fd", "fd_gain_vs_main", "fd_gain_vs_main_low",
                      "fd_gain_vs_main_high", "kid", "precision", "recall", "class_accuracy", "seconds",
                      "seconds_per_image", "same_run_as"]
    table = result["ablations"]["rows"]
    assert len(rows) == len(table) + 1
    for row, r in zip(rows, table):
        assert (row["group"], row["setting"], row["scheduler"], int(row["steps"]), float(row["guidance"])) == \
            (r["group"], r["setting"], r["scheduler"], r["steps"], r["guidance"])
        assert float(row["fd"]) == pytest.approx(r["fd"]) and float(row["recall"]) == pytest.approx(r["recall"])
        assert float(row["fd_gain_vs_main"]) == pytest.approx(r["fd_gain_vs_main"])
        interval = r["fd_gain_vs_main_interval"]
        assert [row["fd_gain_vs_main_low"], row["fd_gain_vs_main_high"]] == \
            ([str(interval[0]), str(interval[1])] if interval else ["", ""])
    floor = result["ablations"]["floor"]
    assert rows[-1]["group"] == "floor" and rows[-1]["setting"] == E.FLOOR_LABEL
    for key in ("fd", "kid", "precision", "recall"):
        assert float(rows[-1][key]) == pytest.approx(floor[key]), key


def test_an_fd_range_cut_at_0_is_said_to_be(stub_seeded, tmp_path):
    """The floor as "2.331 (0 to 5.564)" read as "the floor could be 0": the range is the resamples' spread moved
    onto the measured FD and cut at 0. The report says when a range was cut there."""
    result, _, _, _ = stub_seeded
    res = {k: v for k, v in result.items() if k != "card"}
    iv = {"level": 0.9, "resamples": 20, "held_out_patients": 4, "groups_of_one_patient": [],
          "fd": [1.5, 3.0], "floor_fd": [0.9, 2.0]}
    said = "A range from 0 was cut there"
    res["realism"] = {**res["realism"], "fd_intervals": iv}
    assert said not in E.write_report(res, tmp_path).read_text()
    res["realism"] = {**res["realism"], "fd_intervals": {**iv, "floor_fd": [0.0, 5.564]}}
    report = E.write_report(res, tmp_path).read_text()
    assert said in report and "(0 to 5.564)" in report


def test_the_reports_opening_follows_the_model_and_the_data(stub_seeded, tmp_path):
    """An unconditional model's samples are "in all", without a guidance scale; the demo-data line and the
    changed-split warning appear exactly when the record says so."""
    result, _, _, _ = stub_seeded
    res = {k: v for k, v in result.items() if k != "card"}
    report = E.write_report(res, tmp_path).read_text()
    assert "_The data is the synthetic MNI152-based demo set, not ADNI._" in report
    assert "the split differs" not in report
    res["data"] = {**res["data"], "matches_training": True}
    report = E.write_report(res, tmp_path).read_text()
    assert "the split differs" not in report and "cannot be confirmed" not in report
    res["data"] = {**res["data"], "matches_training": None}  # records without a split summary: read as "differs"
    report = E.write_report(res, tmp_path).read_text()
    assert "the split differs" not in report and "never saw cannot be confirmed" in report
    res["data"] = {**res["data"], "matches_training": False, "data_source_is_demo": False}
    report = E.write_report(res, tmp_path).read_text()
    assert "**Warning: the split differs from the one recorded at training time" in report
    assert "synthetic MNI152-based demo set" not in report
    assert "first stage" not in report
    res["data"] = {**res["data"], "first_stage_held_out": False}
    assert "**Warning: the VQModel (first stage) held out other patients than the UNet" in \
        E.write_report(res, tmp_path).read_text()
    res["data"] = {**res["data"], "first_stage_held_out": None, "first_stage_unconfirmed": True}
    assert "**Warning: the UNet's records hold no record of the patients its VQModel (first stage) held out" in \
        E.write_report(res, tmp_path).read_text()
    res["model"] = {**res["model"], "conditional": False}
    report = E.write_report(res, tmp_path).read_text()
    assert "Samples: 6 in all from `dpm++` with 3 steps, no refinement, seed 5" in report


def test_an_evaluation_cut_short_in_its_umap_keeps_its_numbers(demo_root, tmp_path, monkeypatch):
    """The UMAP comes after the main numbers, as the ablations do: cut short there, metrics.json and report.md of
    the finished measurement are already written (marked incomplete)."""
    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Fe, "umap_plot", cut_short)
    model = _stub_model_folder(tmp_path / "model", demo_root)
    with pytest.raises(KeyboardInterrupt):
        E.evaluate_model(model, num_samples=2, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                         feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                         diversity_pairs=2, kid_subsets=3, umap=True, render_card=False, progress=False,
                         device="cpu", pipe=_StubPipe())
    partial = json.loads((model / "evaluation" / "metrics.json").read_text())
    assert partial["complete"] is False and partial["realism"]["generated"]["candidate_images"] == 4
    assert "**Incomplete:**" in (model / "evaluation" / "report.md").read_text()


def test_evaluate_model_checks_out_for_files_no_evaluation_made_and_a_refused_run_keeps_an_earlier_one(
        demo_root, tmp_path):
    """evaluate_model itself refuses an --out with the user's files under an evaluation's names (the existing test
    calls check_earlier_outputs alone), and an earlier evaluation's outputs go only once everything is checked: a
    run refused at the data (class names that differ) leaves them as they were."""
    model = _stub_model_folder(tmp_path / "model", demo_root)
    mine = tmp_path / "figures"
    mine.mkdir()
    (mine / "report.md").write_text("# my paper's notes\n")
    with pytest.raises(E.EvaluationError, match="which this evaluation would replace"):
        E.evaluate_model(model, num_samples=2, out=mine, device="cpu", progress=False, render_card=False,
                         pipe=_StubPipe())
    assert (mine / "report.md").read_text() == "# my paper's notes\n"
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    record = json.dumps({"realism": {}, "settings": {}, "feature_net": {}})
    (earlier / "metrics.json").write_text(record)
    (earlier / "umap.png").write_bytes(b"png")
    pipe = _StubPipe()
    pipe.config = SimpleNamespace(class_names=["AD", "MCI"])
    with pytest.raises(E.EvaluationError, match="differ from the model's class names"):
        E.evaluate_model(model, num_samples=2, out=earlier, device="cpu", progress=False, render_card=False, pipe=pipe)
    assert (earlier / "metrics.json").read_text() == record and (earlier / "umap.png").is_file()


def test_an_unconditional_models_samples_are_counted_in_all(demo_root, tmp_path, monkeypatch):
    """--num-samples of an unconditional model is the number in all: sampled without class labels or guidance, and
    recorded so ("total" in metrics.json, "in all" in the report, no guidance scale)."""
    calls = []
    sample = E.sample_images

    def sample_spy(pipe, labels, **kw):
        calls.append((list(labels), kw["guidance"]))
        return sample(pipe, labels, **kw)

    monkeypatch.setattr(E, "sample_images", sample_spy)
    pipe = _StubPipe()
    pipe.is_conditional = False
    pipe.config = SimpleNamespace(class_names=None)
    model = _stub_model_folder(tmp_path / "model", demo_root)
    result = E.evaluate_model(model, num_samples=4, steps=3, seed=0, feature_epochs=1, tstr_epochs=1,
                              feature_settings={"widths": (4, 8), "input_size": 32, "batch_size": 8, "bn_images": 16},
                              diversity_pairs=2, kid_subsets=3, umap=False, render_card=False, progress=False,
                              device="cpu", pipe=pipe)
    assert calls == [([None] * 4, 1.0)]
    assert result["settings"]["samples_per"] == "total" and result["settings"]["guidance"] == 1.0
    assert result["realism"]["images_per_class"] == {"all": 4}
    report = (model / "evaluation" / "report.md").read_text()
    assert "Samples: 4 in all from `dpm++` with 3 steps, no refinement, seed 0" in report


def test_refinement_longer_than_the_models_default_step_count_is_refused_before_any_work(demo_root, tmp_path,
                                                                                          monkeypatch):
    """Without --steps the step count is known only once the model is loaded (DDPM: its 20 training timesteps
    here, not 1000): --refine-steps 25 passes the first check against 1000 and must be refused against 20."""
    from diffusers import DDPMScheduler

    def no_work(*args, **kwargs):
        raise AssertionError("the feature net was trained before the refinement was checked")

    monkeypatch.setattr(Fe, "get_or_train_feature_net", no_work)
    pipe = _StubPipe()
    pipe.scheduler = DDPMScheduler(num_train_timesteps=20)
    model = _stub_model_folder(tmp_path / "model", demo_root)
    with pytest.raises(E.EvaluationError, match="--refine-steps between 1 and --steps"):
        E.evaluate_model(model, num_samples=2, scheduler="ddpm", refine_steps=25, refine_repeats=1, device="cpu",
                         progress=False, render_card=False, pipe=pipe)


def test_the_reused_main_rows_time_is_its_images_share_of_the_main_run(stub_seeded):
    """The ablation row of the main setting reuses M of the main run's images per class: its seconds are those
    images' share of the main sampling time (per image: the main run's), not the whole main run's."""
    result, _, _, _ = stub_seeded
    off = next(r for r in result["ablations"]["rows"] if r["group"] == "refinement" and r["setting"] == "off")
    per_image = result["timings"]["sampling_seconds_per_image"]
    assert off["seconds_per_image"] == pytest.approx(per_image, rel=1e-9)
    assert off["seconds"] == pytest.approx(4 * per_image, rel=1e-9)


def test_a_folder_of_another_kind_is_named_for_what_it_is(tiny_vq, tmp_path):
    """evaluate --model out/vq said "not a saved pipeline folder": it now says, as generate does, that the folder
    is a VQModel to train a UNet on (or a run with only checkpoints)."""
    import adni_diffusers.evaluate as E

    with pytest.raises(E.EvaluationError, match=r"no model_index.json \(a VQModel \(train_vqmodel.py's output\): "
                                                r"train a UNet on it with train_unet.py --vqmodel\)"):
        E.evaluate_model(tiny_vq, progress=False)
    (tmp_path / "checkpoint-200").mkdir()
    with pytest.raises(E.EvaluationError, match="only training checkpoints: the run has not finished"):
        E.evaluate_model(tmp_path, progress=False)
    with pytest.raises(E.EvaluationError, match=r"no model_index.json \(not a saved pipeline\)"):
        E.evaluate_model(tmp_path / "checkpoint-200", progress=False)
    # a folder that is not there is named so, as generate, held-out and counterfactual name it
    with pytest.raises(E.EvaluationError, match=r"--model .*/missing: no such folder \(a train_unet.py output folder\)"):
        E.evaluate_model(tmp_path / "missing", progress=False)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(E.EvaluationError, match=r"model.safetensors: a file, not a folder \(a train_unet.py output"):
        E.evaluate_model(tmp_path / "model.safetensors", progress=False)


def test_the_ablation_table_says_why_no_row_is_compared_with_a_main_setting_it_lacks():
    """`--refine-steps 2 --refine-repeats 1 --ablations`: the main run is none of the planned rows, every gain cell
    was "-", and the paragraph below still explained the column as filled (an evaluate review, 2026-12-06)."""
    row = {"label": "ddim 3", "same_run_as": None, "scheduler": "ddim", "steps": 3, "refine_steps": 0,
           "refine_repeats": 0, "refine_from_timestep": None, "guidance": 2.0, "fd": 30.0, "kid": 0.1,
           "precision": 0.5, "recall": 0.5, "seconds": 1.0, "seconds_per_image": 0.1}
    floor = {"fd": 5.0, "kid": 0.01, "precision": 0.9, "recall": 0.9, "reference_images": 128, "candidate_images": 128,
             "feature_dims": 256}
    ab = {"rows": [row], "floor": floor, "images_per_class": {"AD": 64, "NC": 64}, "recommendation": {},
          "main_setting": None}
    text = "\n".join(E._ablation_lines(ab, True, {"ablations": "ablations.png"}))
    assert "FD gain: not measured: this evaluation's own setting" in text
    assert "how much lower the row's FD is" not in text
    ab = {**ab, "rows": [{**row, "fd_gain_vs_main": 0.0, "fd_gain_vs_main_interval": None}], "main_setting": "ddim 3"}
    text = "\n".join(E._ablation_lines(ab, True, {"ablations": "ablations.png"}))
    assert "how much lower the row's FD is" in text and "not measured" not in text


def test_another_models_evaluation_folder_is_refused_as_out(model_copy, tmp_path):
    """`evaluate --model unc --out ldm/evaluation` replaced ldm's evaluation with unc's, and ldm's card then showed
    unc's numbers as its own (an evaluate review, 2026-12-06)."""
    other = tmp_path / "other_ldm"
    (other / "evaluation").mkdir(parents=True)
    (other / "model_index.json").write_text("{}")
    (other / "evaluation" / "metrics.json").write_text(json.dumps({"realism": {}, "settings": {}, "feature_net": {}}))
    with pytest.raises(E.EvaluationError, match=rf"--out {re.escape(str(other / 'evaluation'))}: the evaluation of "
                                                rf"another model \({re.escape(str(other))}\), which its model card "
                                                "reads; choose another --out"):
        E.check_earlier_outputs(other / "evaluation", model_copy)
    E.check_earlier_outputs(model_copy / "evaluation", model_copy)  # its own


def test_the_precision_of_the_samples_is_in_the_report_and_the_card():
    """--dtype float16 moved FD (34.40 against 34.49) while report.md and the card read as a float32 run's."""
    from adni_diffusers.model_card import _evaluation_settings

    settings = {"num_samples": 4, "samples_per": "class", "scheduler": "dpm++", "steps": 3, "guidance": 2.0,
                "refine_steps": 0, "refine_repeats": 0, "seed": 0}
    assert _evaluation_settings({"settings": {**settings, "dtype": "float16"}}).endswith(", seed 0, in float16")
    assert "float32" not in _evaluation_settings({"settings": {**settings, "dtype": "float32"}})


@pytest.mark.parametrize("flag", ["--data-dir", "--feature-cache", "--device"])
def test_an_empty_flag_is_refused_not_read_as_its_default(tmp_path, capsys, flag):
    """`--data-dir $DATA` with DATA unset measured the data recorded at training, without a word."""
    from adni_diffusers import cli

    assert cli.main(["evaluate", "--model", str(tmp_path), flag, ""]) == 2
    assert f"{flag} is empty; leave it out for the default, or give a value" in capsys.readouterr().err


def test_a_hub_id_as_model_is_told_evaluate_needs_a_local_copy(tmp_path, capsys, monkeypatch):
    """generate and counterfactual take a Hub id; evaluate said only "no such folder"."""
    from adni_diffusers import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", "--model", "someuser/adni-ldm"]) == 2
    err = capsys.readouterr().err
    assert "--model someuser/adni-ldm: no such folder" in err and "evaluate needs a local copy" in err
    assert "hf download someuser/adni-ldm --local-dir" in err
    assert cli.main(["evaluate", "--model", "nowhere"]) == 2
    assert "local copy" not in capsys.readouterr().err  # a mistyped folder, not a Hub id


def test_an_interrupted_evaluation_says_what_it_left(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the UMAP or the ablations said "interrupted" alone, while metrics.json and report.md (marked
    incomplete) held the main run's numbers."""
    from adni_diffusers import cli

    out = tmp_path / "ev"
    out.mkdir()

    def interrupted(args):
        (out / "metrics.json").write_text(json.dumps({"complete": False}))
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["adni-diffusers", "evaluate", "--model", str(tmp_path), "--out", str(out)])
    assert cli.main() == 130
    assert capsys.readouterr().err.strip() == (
        f"adni-diffusers evaluate: interrupted; {out / 'metrics.json'} and report.md hold what was measured so far, "
        "marked incomplete; a rerun samples again (the feature net is cached)")
    (out / "metrics.json").write_text(json.dumps({"complete": True}))  # an earlier run's, whole: not this one's
    monkeypatch.setattr(E, "main", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main() == 130
    assert capsys.readouterr().err.strip() == "adni-diffusers evaluate: interrupted"


@pytest.mark.parametrize("classes, says", [([], "The data has no class folders, so the net learned slice position"),
                                           (["AD"], "The data has one class (AD), so the net learned slice position")])
def test_the_feature_net_of_unlabelled_data_is_not_given_a_class_accuracy(evaluated, tmp_path, classes, says):
    """An unconditional model of an unlabelled (or one-class) folder: the net's class head has one class, so its
    held-out accuracy is 100% by construction; the report gave it as "accuracy 100.0% per slice, 100.0% per patient"
    and told the reader to read class numbers against it."""
    result, _ = evaluated
    res = {k: v for k, v in result.items() if k != "card"}
    res["data"] = {**res["data"], "class_names": classes}
    text = E.write_report(res, tmp_path).read_text()
    section = text.split("## Feature network")[1].split("##")[0]
    assert says in section and "per patient" not in section and "read the class numbers" not in section
    (tmp_path / "two").mkdir()
    two = E.write_report({k: v for k, v in result.items() if k != "card"}, tmp_path / "two").read_text()
    assert "per patient" in two.split("## Feature network")[1].split("##")[0]  # an AD/NC model's keeps its accuracy


def test_a_model_folder_a_live_run_trains_into_is_refused(tiny_ldm, tmp_path):
    """`evaluate --model ldm` while `train_unet.py --output_dir ldm --resume_from_checkpoint latest` trained on
    (reproduced with 4 -> 120 steps): the evaluation measured the 4-step model still there and wrote evaluation/
    after the run had set the earlier one aside; the final save then put the 120-step UNet beside it, and its card
    said "trained for 120 optimizer steps" above the 4-step model's FD, KID and precision (metrics.json records no
    fingerprint of the weights it measured), for a push to upload as the new model's."""
    import socket
    import subprocess
    import time

    from adni_diffusers import files
    from adni_diffusers.evaluate import EvaluationError, evaluate_model

    model = tmp_path / "ldm"
    shutil.copytree(tiny_ldm, model, ignore=shutil.ignore_patterns("evaluation", "feature_net", "checkpoint-*"))
    # a live process whose command line names a training script, as `python train_unet.py ...` does
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train_unet.py"])
    try:
        cmdline = Path(f"/proc/{trainer.pid}/cmdline")
        for _ in range(200):  # until the child runs python (before its exec it is a copy of this one)
            if not cmdline.exists() or b"train_unet.py" in cmdline.read_bytes():
                break
            time.sleep(0.05)
        (model / ".training_in_progress").write_text(json.dumps(
            {"pid": trainer.pid, "host": socket.gethostname(), "script": "train_unet.py",
             "started": "2026-12-07T17:48:20+00:00"}))
        with pytest.raises(EvaluationError, match=rf"--model {re.escape(str(model))}: train_unet.py \(pid "
                                                   rf"{trainer.pid}, started 2026-12-07T17:48:20\+00:00\) is training "
                                                   "into it"):
            evaluate_model(model, num_samples=2, device="cpu")
        assert not (model / "evaluation").exists()
    finally:
        trainer.kill()
        trainer.wait()
    # a run that has just started (an --overwrite_output_dir one loading its data) holds the folder's lock before it
    # writes the marker: the evaluation ran, and the run then removed the model it was reading
    (model / ".training_in_progress").unlink()
    with another_process_holding(model, "--output_dir", "train_unet.py") as starting:
        with pytest.raises(EvaluationError, match=rf"--model {re.escape(str(model))}: train_unet.py, pid "
                                                   rf"{starting.pid} on .* is training into it"):
            evaluate_model(model, num_samples=2, device="cpu")
    # train_unet's own final evaluation of the folder its process holds goes on
    from adni_diffusers import training

    training.hold_output_dir(model, "train_unet.py")
    try:
        assert files.folder_in_use(model) is not None and files.folder_in_use(model, by_others_only=True) is None
    finally:
        training.release_output_dir()


def test_a_second_evaluation_into_the_same_out_while_one_writes_there_is_refused(demo_root, tmp_path):
    """Two evaluations into one --out at once (the default, beside the model, for both): the second removed the first's
    outputs as an earlier run's, and the first then printed its FD and "report: <out>/report.md" over the second's
    files. The second is refused now, naming the first, before it removes anything."""
    from adni_diffusers import files

    model = _stub_model_folder(tmp_path / "model", demo_root)
    out = model / "evaluation"
    out.mkdir()
    (out / "report.md").write_text("the first run's report, being written\n")
    with another_process_holding(out, "--out", "evaluate") as first:
        with pytest.raises(E.EvaluationError, match=rf"^--out {re.escape(str(out))}: another run is writing there "
                                                    rf"now \(evaluate, pid {first.pid} on "):
            E.evaluate_model(model, num_samples=2, steps=2, render_card=False, progress=False, device="cpu",
                             pipe=_StubPipe())
        assert (out / "report.md").read_text() == "the first run's report, being written\n"
    assert files.folder_in_use(out) is None


def test_the_floor_interval_redraws_its_training_images_in_every_resample():
    """The floor's training images are drawn afresh in each resample (one draw of them is the floor's other source
    of chance). With two held-out patients whose slices are the same, a resample of the patients is the same
    reference every time, so the floor's range is that of the training draw alone: drawing the same training rows
    in every resample gave no range at all (`floor_fd_unvaried`), as if the floor were known exactly."""
    g = torch.Generator().manual_seed(0)
    one_patient = torch.randn(5, 4, generator=g)
    held = torch.cat([one_patient, one_patient])  # patients a and b: alike, slice for slice
    gen, train = torch.randn(10, 4, generator=g), torch.randn(60, 4, generator=g)
    zeros = torch.zeros
    iv = E.fd_intervals(held_feats=held, held_groups=zeros(10, dtype=torch.long), held_patients=["a"] * 5 + ["b"] * 5,
                        gen_feats=gen, gen_groups=zeros(10, dtype=torch.long), train_feats=train,
                        train_groups=zeros(60, dtype=torch.long), counts={0: 10}, seed=0,
                        measured=(E.M.frechet_distance(held, gen), E.M.frechet_distance(held, train[:10])),
                        resamples=50)
    assert "floor_fd_unvaried" not in iv and iv["floor_fd"] is not None
    assert iv["floor_fd"][1] - iv["floor_fd"][0] > 0.05 * iv["floor_fd"][1], iv["floor_fd"]
