#!/usr/bin/env python
"""Does `pipe.enable_model_cpu_offload()` give the images of the pipeline kept on the GPU? The same model,
seeds and sampler both ways, for sampling (class-conditional where the model is) and for the image-to-image
path (`image=`, which encodes with the offloaded VQModel), with the peak GPU memory of each.

    python benchmarks/offload_check.py --model out/ldm --out offload.json

diffusers' offload hooks move each network to the GPU only for its forward; the pipeline's own encode,
decode and re-quantisation run outside those forwards (`pipeline_adni_ldm._onload`), and a CPU test can
only stand in for the GPU with a "meta" execution device. Without CUDA this writes `"checked": false`.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_both_paths(pipe, label, steps: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Images in [0, 1] on the CPU: sampled from noise, then the same images through `image=` at strength 0.5."""
    sampled = pipe(batch_size=n, class_labels=label, num_inference_steps=steps,
                   generator=torch.Generator().manual_seed(seed), output_type="pt").images.cpu()
    edited = pipe(image=sampled, class_labels=label, num_inference_steps=steps, strength=0.5,
                  generator=torch.Generator().manual_seed(seed + 1), output_type="pt").images.cpu()
    return {"sampled": sampled, "image_to_image": edited}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--model", required=True, help="a saved pipeline folder")
    p.add_argument("--steps", type=int, default=2, help="scheduler steps (the paths are the same at any count)")
    p.add_argument("--num-images", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    opts = p.parse_args(argv)
    result = {"model": opts.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__}
    if not torch.cuda.is_available():
        result.update(checked=False, reason="no CUDA device: enable_model_cpu_offload needs one")
    else:
        from adni_diffusers.generate import load_pipeline

        label = None
        images, peak_mb = {}, {}
        for mode in ("on_gpu", "offloaded"):
            pipe = load_pipeline(opts.model, "cpu", torch.float32)
            label = (pipe.class_names or [None])[0]
            pipe.set_progress_bar_config(disable=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if mode == "offloaded":
                pipe.enable_model_cpu_offload()
            else:
                pipe.to("cuda")
            images[mode] = run_both_paths(pipe, label, opts.steps, opts.num_images, opts.seed)
            peak_mb[mode] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            del pipe
        diff = {path: float((images["on_gpu"][path] - images["offloaded"][path]).abs().max() * 255)
                for path in images["on_gpu"]}
        result.update(checked=True, device_name=torch.cuda.get_device_name(), class_label=label,
                      max_grey_level_difference=diff, peak_gpu_memory_mb=peak_mb,
                      same_images=all(d < 1.0 for d in diff.values()))
    text = json.dumps(result, indent=2)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
