#!/usr/bin/env python
"""Stage 1: train diffusers' VQModel (1x256x256 slice -> 4x32x32 latent) with Accelerate.

    accelerate launch train_vqmodel.py --train_data_dir AD_NC --output_dir out/vq --preset base

Writes `out/vq/vqvae/` (load with `VQModel.from_pretrained`), with `scaling_factor` computed from
the data, plus `metrics.json` (PSNR/SSIM/MS-SSIM on held-out patients, codebook usage), a
reconstruction grid and the loss curves. Without `--train_data_dir` it builds and uses the demo set.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import torch

from adni_diffusers import training
from adni_diffusers.cli import HelpFormatter

logger = logging.getLogger("adni_diffusers.train_vqmodel")

DEFAULT_LR = 2e-4
DEFAULT_BATCH = 8
# beside training.RESUME_MUST_MATCH: the losses a resumed run must keep
DEFAULT_DISC_START = 2000
RESUME_MUST_MATCH = ("rec_loss", "ssim_weight", "codebook_weight", "commitment_beta", "codebook_restart_steps",
                     "no_codebook_init", "disc_weight", "disc_start", "disc_learning_rate")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_vqmodel.py",  # not sys.argv[0]: a notebook's is its kernel's
                                     description=__doc__.splitlines()[1], formatter_class=HelpFormatter)
    training.add_training_arguments(parser, default_lr=DEFAULT_LR, default_batch=DEFAULT_BATCH)
    g = parser.add_argument_group("VQModel")
    g.add_argument("--preset", default="base", help="tiny | small | base | wide (the seed's size), or a JSON VQModel config")
    g.add_argument("--rec_loss", default="mse", choices=["mse", "l1"], help="reconstruction loss (the seed used MSE)")
    g.add_argument("--ssim_weight", type=float, default=0.5,
                   help="weight of a (1 - SSIM) term (measured: better reconstructions per step); 0 = off")
    g.add_argument("--codebook_weight", type=float, default=1.0, help="weight of ||sg[E(x)] - e||^2")
    g.add_argument("--commitment_beta", type=float, default=0.25, help="weight of ||E(x) - sg[e]||^2")
    g.add_argument("--codebook_restart_steps", type=int, default=50,
                   help="every N steps move dead codes onto encoder outputs; 0 = never")
    g.add_argument("--no_codebook_init", action="store_true",
                   help="keep diffusers' uniform codebook init instead of starting on encoder outputs")
    g.add_argument("--disc_weight", type=float, default=0.0, help="patch-discriminator (VQGAN) loss weight; 0 = off")
    g.add_argument("--disc_start", type=int, default=None,
                   help=f"step at which the discriminator starts (default {DEFAULT_DISC_START}; with --disc_weight)")
    g.add_argument("--disc_learning_rate", type=float, default=None,
                   help="default: --learning_rate (with --disc_weight); --scale_lr scales it too")
    g.add_argument("--save_images_steps", type=int, default=250, help="reconstruction grid every N steps")
    g.add_argument("--eval_max_images", type=int, default=2000, help="held-out images used by the final metrics")
    g.add_argument("--validation_max_images", type=int, default=256,
                   help="held-out images (the same ones each time, drawn per class) measured every --validation_steps")
    from adni_diffusers.hub import add_hub_arguments

    add_hub_arguments(parser)
    args = parser.parse_args(argv)
    training.validate_training_arguments(args)
    training.require_at_least(args, 1, "save_images_steps", "eval_max_images", "validation_max_images")
    training.require_at_least(args, 0, "codebook_restart_steps", "disc_start", "ssim_weight", "codebook_weight",
                              "commitment_beta", "disc_weight")
    training.require_positive(args, "disc_learning_rate")
    # given at all without a discriminator: refused, as --cond_dropout without --conditional (it did nothing)
    given = [f"--{name} {getattr(args, name):g}" for name in ("disc_start", "disc_learning_rate")
             if getattr(args, name) is not None]
    if given and not args.disc_weight > 0:
        verb = "need" if len(given) > 1 else "needs"
        raise training.TrainingError(f"{', '.join(given)} {verb} --disc_weight above 0 (the patch discriminator is "
                                     "off without it)")
    if args.disc_start is None:  # the value recorded (training_args.json, checkpoints) as before
        args.disc_start = DEFAULT_DISC_START
    training.check_hub_flags(args)
    return args


@training.keeps_session_logging
def main(args: argparse.Namespace) -> dict:
    from diffusers import VQModel

    from adni_diffusers import vq_eval
    from adni_diffusers.compile_probe import make_spec
    from adni_diffusers.data import IMAGE_SIZE, SliceDataset, fingerprint
    from adni_diffusers.presets import vq_config
    from adni_diffusers.vq import (CodebookMonitor, PatchDiscriminator, VQTrainingModel, adaptive_gan_weight, code_counts,
                                   fail_step_if, flatten_latents, hinge_d_loss, vq_training_loss)

    config, accelerator = training.start_stage(args, vq_config, "vqmodel", product="vqvae",
                                               stage_flags=RESUME_MUST_MATCH)
    training.check_resume_model(args, config, "vqmodel")
    device = accelerator.device
    # on CUDA the compile check's child compiles the VQModel's step while this process decodes the slices
    compile_check = training.start_compile_check(args, make_spec("vqmodel", config, args, accelerator,
                                                                 (1, IMAGE_SIZE, IMAGE_SIZE)))
    data, data_source = training.load_training_data(args, accelerator)

    model = VQTrainingModel(training.to_channels_last(VQModel(**config), args))
    monitor = CodebookMonitor(config["num_vq_embeddings"]).to(device)
    loader, sampler = training.make_dataloader(SliceDataset(data.train), args, accelerator)
    optimizer = training.make_optimizer(model.parameters(), args, accelerator, DEFAULT_BATCH)
    model, optimizer, loader, lr_scheduler = training.prepare_for_training(accelerator, args, model, optimizer, loader)
    use_gan = args.disc_weight > 0
    if use_gan:
        disc = PatchDiscriminator().to(device)
        # VQGAN's discriminator optimiser: Adam, betas (0.5, 0.9), no weight decay (AdamW's default is 0.01)
        # --scale_lr scales it as the generator's: else the two rates' balance changed with the number of GPUs
        disc_lr = training.scaled_learning_rate(args, accelerator.num_processes, DEFAULT_BATCH,
                                                args.disc_learning_rate or args.learning_rate)
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
        bare_disc = training.bare_model(accelerator, disc)
    bare = training.bare_model(accelerator, model)  # outside DDP: the VQModel to save, the GAN weight's last layer
    vq = bare.vq

    def training_loss(m, x):
        """A step's loss without the GAN term, with the forward's output and the parts to log."""
        return vq_training_loss(m, x, rec_loss=args.rec_loss, codebook_weight=args.codebook_weight,
                                commitment_beta=args.commitment_beta, ssim_weight=args.ssim_weight)

    # the probe runs the steps' own loss: with the reconstruction loss alone the codebook got no gradient, and
    # under DDP the first step then stopped ("Expected to have finished reduction in the prior iteration")
    probe_x = SliceDataset(data.train)[0]["pixel_values"][None].repeat(args.train_batch_size, 1, 1, 1).to(device)
    model = training.maybe_compile(model, args, probe=lambda m: training_loss(m, probe_x)[0].backward(),
                                   child_probe=compile_check)
    ema = training.make_ema(vq, args, device)

    def validate():  # --validation_steps: the held-out reconstructions of the weights a save now would keep
        with training.weights_to_save(vq, ema):
            measured = vq_eval.reconstruct_and_measure(vq, data.val, device, args.eval_batch_size,
                                                       args.validation_max_images, args.seed)
        return {"val_psnr": measured["psnr"], "val_ssim": measured["ssim"]}

    training.clear_earlier_run(args, accelerator, "vqvae", "vqmodel")  # every check passed: now, not before
    run = training.TrainingRun(
        args, accelerator, loader, sampler, model, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
        stage="VQModel",
        stage_flags=RESUME_MUST_MATCH, identity={"model_config": config, "train_data": fingerprint(data.train)},
        extra_state=lambda: {"tensors": {"codebook_usage": monitor.usage, "codebook_age": monitor.age,
                                          "codebook_initialised": monitor.initialised.reshape(1)}},
        restore_extra_state=lambda t, m: monitor.restore(t["codebook_usage"], t["codebook_initialised"][0],
                                                         t.get("codebook_age")),
        validate=validate if len(data.val) else None,
    )
    run.resume()
    if use_gan:  # its constant rate for this run's processes, not the one a checkpoint from other processes holds
        for group in disc_optimizer.param_groups:
            group["lr"] = disc_lr
    if use_gan and args.disc_start >= run.max_train_steps:
        logger.warning("--disc_weight %g: the adversarial loss starts at --disc_start %d, and this run ends at step %d: "
                       "it trains without it (lower --disc_start to use it)", args.disc_weight, args.disc_start,
                       run.max_train_steps)
    training.start_logging(accelerator, args, "vqmodel", run.start_step)
    if accelerator.is_main_process:
        training.save_run_info(args.output_dir, args, data, data_source, {"stage": "vqmodel"}, model=model,
                               accelerator=accelerator, start_step=run.start_step, default_batch=DEFAULT_BATCH)
    preview, preview_labels = vq_eval.preview_batch(data.val or data.train, seed=args.seed)
    preview_columns = vq_eval.column_classes(preview_labels, data.class_names)
    if accelerator.is_main_process and run.start_step and run.start_step % args.save_images_steps == 0 \
            and not _grid_path(args.output_dir, run.start_step).exists():
        # a stop at a checkpoint step (a job's time limit) comes before that step's grid: drawn now, from the
        # checkpoint's weights, which are that step's (else the grid of every such stop was missing for good)
        logger.info("drawing step %d's reconstruction grid, which the stopped run did not", run.start_step)
        _log_reconstructions(accelerator, vq, ema, preview, run.start_step, args.output_dir, preview_columns)

    codebook_ready = bool(monitor.initialised) or args.no_codebook_init  # a Python bool: no device sync per step
    step_counts = None  # this step's code counts so far
    start = time.time()
    for batch in run.batches():
        x = batch["pixel_values"]
        if not codebook_ready:
            with torch.no_grad():  # start every code on a real encoder output (same on every process)
                vectors = accelerator.gather(flatten_latents(vq.encode(x).latents.float()))
                monitor.initialise(vq.quantize.embedding.weight.data, vectors, run.step_generator(shared=True))
            codebook_ready = True
        with accelerator.accumulate(model, *( [disc] if use_gan else [])):
            loss, out, logs = training_loss(model, x)
            gan_on = use_gan and run.global_step >= args.disc_start
            if gan_on:
                g_loss = generator_gan_loss(bare_disc, out.recon)
                # VQGAN's L_rec is the whole reconstruction loss (taming's nll: pixels + perceptual), here pixels
                # + SSIM; until 2026-12-06 the pixel term alone (a weight ~14% too small in a 40-step tiny run)
                whole_rec = logs["rec_loss"] + args.ssim_weight * logs["ssim_loss"] if "ssim_loss" in logs \
                    else logs["rec_loss"]
                weight, overflowed = adaptive_gan_weight(whole_rec, g_loss, bare.last_layer(),
                                                         loss_scale=training.loss_scale(accelerator))
                loss = loss + args.disc_weight * weight * g_loss
                if accelerator.scaler is not None:  # fp16: an overflow in the weight skips the step, as any other
                    loss = fail_step_if(loss, overflowed)
                logs.update(g_loss=g_loss, gan_weight=weight)
            run.backward(loss)
            if accelerator.sync_gradients:
                logs.update(run.clip_gradients(model.parameters()))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if gan_on:
                d_loss = hinge_d_loss(disc(x), disc(out.recon.detach()))
                run.backward(d_loss)
                disc_optimizer.step()
                disc_optimizer.zero_grad(set_to_none=True)
                logs["d_loss"] = d_loss

        # code usage per optimizer step (every micro-batch and process): the unit of the dead-code threshold
        counts = code_counts(out.indices, monitor.usage.numel())
        step_counts = counts if step_counts is None else step_counts + counts
        logs["loss"] = loss.detach()
        if not accelerator.sync_gradients:  # gradient accumulation: the step logs its micro-batches' means
            run.log_micro_batch(logs)
            continue
        counts, step_counts = accelerator.reduce(step_counts, reduction="sum"), None
        monitor.update(counts)
        logs.update(perplexity=monitor.perplexity(counts), live_code_fraction=monitor.live_fraction())
        # not at the last step: codes moved there would be saved and counted as used by the evaluation (9% of a
        # 120-step run's held-out latent pixels fell on them, codes in use 94% against 90% without) although no
        # step ever trained the decoder with them
        if args.codebook_restart_steps and (run.global_step + 1) % args.codebook_restart_steps == 0 \
                and run.global_step + 1 < run.max_train_steps:
            # candidates from every image of this process's micro-batch, not the first 4 images' 4,096 latents
            latents = flatten_latents(out.latents.detach().float())
            picked = torch.randperm(len(latents), generator=run.step_generator(), device=latents.device)[:4096]
            vectors = accelerator.gather(latents[picked])
            codebook = vq.quantize.embedding.weight
            restarted = monitor.restart_dead(codebook.data, vectors, run.step_generator(shared=True))
            if ema is not None:
                ema.copy_rows(vq, codebook, restarted)
            logs["restarted_codes"] = torch.tensor(float(len(restarted)))
        run.end_step(logs)
        if accelerator.is_main_process and run.global_step % args.save_images_steps == 0:
            _log_reconstructions(accelerator, vq, ema, preview, run.global_step, args.output_dir, preview_columns)
    run.finish()
    train_seconds = time.time() - start

    # ---- the finished model: EMA weights, scaling factor from the data, evaluation -------------
    with run.final_phase():  # a stop signal now (a job's time limit near) lets this finish
        accelerator.wait_for_everyone()
        metrics = {}
        if accelerator.is_main_process:
            if ema is not None:
                ema.ema.copy_to(vq.parameters())
            training.forget_earlier_results(args.output_dir, "metrics.json", "reconstructions.png")
            metrics = vq_eval.evaluate_and_save(vq, data, args, device, extra={
                "preset": args.preset, "train_steps": run.global_step,
                "train_steps_this_run": run.global_step - run.start_step,  # what the rate covers after a resume
                "train_seconds_this_run": round(train_seconds, 1),
                "train_images_per_second_this_run": run.images_per_second(train_seconds),
                "train_images_per_second_steady": run.steady_images_per_second(),
                "num_processes": accelerator.num_processes, "data_source": data_source,
                # where the EMA's warm-up got to (--ema_max_decay 0.9999 takes about 10**5 steps): the card says it
                **({"ema_decay_reached": float(ema.ema.get_decay(ema.ema.optimization_step))} if ema is not None
                   else {}),
                **({"recompiled_graphs": run.recompiled_graphs} if args.compile else {}),
            })
            run.log_final_metrics(metrics, ["mse", "psnr", "ssim", "ms_ssim", "psnr_brain", "ssim_brain",
                                            "codebook_usage", "code_perplexity"])
            from adni_diffusers.model_card import write_model_card

            write_model_card(args.output_dir, None, args, data_source=data_source)
            logger.info("the VQModel is in %s (vqvae/; metrics.json, reconstructions.png beside it): train the UNet "
                        "on it with %s --vqmodel %s. %s", args.output_dir,
                        training.stage_command("train_unet").removeprefix("python "), shlex.quote(str(args.output_dir)),
                        training.where_to_watch(args))
            training.push_if_asked(accelerator, args)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def generator_gan_loss(disc, recon: torch.Tensor) -> torch.Tensor:
    """The VQModel's adversarial loss, through the bare discriminator (no DDP wrapper) with its parameters
    frozen for this forward: the gradient reaches the VQModel and leaves none in the discriminator, whose
    optimizer must step on its own loss only."""
    disc.requires_grad_(False)
    try:
        return -disc(recon).mean()
    finally:
        disc.requires_grad_(True)  # the graph above is built: the discriminator's own loss needs its gradients


def _grid_path(output_dir, step: int) -> Path:
    return Path(output_dir) / "samples" / f"reconstructions-{step:06d}.png"


@torch.no_grad()
def _log_reconstructions(accelerator, vq, ema, preview, step, output_dir, columns=None):
    """The preview slices reconstructed by the weights a save now would keep (the EMA's with --use_ema); `columns`
    names their classes, above them."""
    x = preview.to(accelerator.device)
    with training.weights_to_save(vq, ema):
        recon = vq(x).sample.float().clamp(-1, 1)
    weights = training.weights_label(ema)
    return training.log_image_grid(accelerator, "reconstructions", torch.cat([x.float(), recon]), step,
                                   _grid_path(output_dir, step), nrow=len(x),
                                   row_titles=["original", "reconstruction"],
                                   caption=f"step {step}, {weights}", col_titles=columns)


def cli(argv=None) -> int:
    return training.run_cli("train_vqmodel.py", parse_args, main, argv)

if __name__ == "__main__":
    sys.exit(cli())
