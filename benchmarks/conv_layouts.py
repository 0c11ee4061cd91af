"""The memory format of every `aten.convolution_backward` argument in one `base` UNet training step.

On a GPU, aten's cuDNN path turns the input and the incoming gradient into the memory format it picks for cuDNN
(channels_last when the weight is), so each NCHW or not dense one costs a copy inside the call: the H200 profile
of 2026-12-04 had 93 such copies a step, 18% of the kernel time (docs/performance.md). This script shows what the
compiled graph hands the call, on the CPU: inductor's CPU backend with oneDNN off, so that inductor's
`decide_layout_opt` takes the branch it takes on CUDA, and NNPACK off: aten's CPU convolution picks NNPACK
from batch 16 on, which is NCHW only, so the graph's layouts would follow it (CUDA has no NNPACK; until
2026-12-04 this script left it on, and its batch-64 rows showed NNPACK's layouts, not the graph CUDA gets).
Caches off: the layouts are decided while compiling, and inductor's cache key does not hold these flags.
A `TorchDispatchMode` sees the generated code's calls.

    python benchmarks/conv_layouts.py --batch-size 64 --size 8 --how compiled   # inductor's own layout choice
    python benchmarks/conv_layouts.py --batch-size 64 --size 8 --how forced     # force_layout_optimization=True
    python benchmarks/conv_layouts.py --batch-size 64 --size 8 --how eager
    python benchmarks/conv_layouts.py --device cuda --bf16 --batch-size 256 --size 32   # what the GPU's step gets

`--size` is the latents' side (32 in training; 8 keeps a CPU compile to a few minutes and keeps the layouts,
except where a side reaches 1 and channels_last is ambiguous). Prints one line per layout combination
(gradient, input, weight: CL = channels_last, NCHW, both = dense in either, other = not dense), their dtypes,
and the gradient shapes of the calls that get an NCHW or not dense gradient or input.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CL = torch.channels_last


def layout(t: torch.Tensor) -> str:
    channels_last, contiguous = t.is_contiguous(memory_format=CL), t.is_contiguous()
    if channels_last and contiguous:
        return "both"
    return "CL" if channels_last else ("NCHW" if contiguous else "other")


class ConvolutionBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.dtypes, self.shapes = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            grad, inp, weight = args[:3]
            self.calls.append((layout(grad), layout(inp), layout(weight)))
            self.dtypes.append(tuple(str(t.dtype).removeprefix("torch.") for t in (grad, inp, weight)))
            self.shapes.append(tuple(grad.shape))
        return func(*args, **(kwargs or {}))


def main(argv=None) -> dict:
    import torch._inductor.config as inductor_config
    from diffusers import UNet2DModel

    from adni_diffusers.presets import unet_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=8, help="the latents' side (training: 32)")
    p.add_argument("--how", choices=["compiled", "forced", "eager"], default="compiled")
    p.add_argument("--preset", default="base")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="autocast the forward to bf16, as train_unet's default does")
    opts = p.parse_args(argv)

    inductor_config.force_layout_optimization = opts.how == "forced"
    inductor_config.force_disable_caches = True  # compile here, under the flags below
    inductor_config.size_asserts = False  # aten's CPU convolution without oneDNN returns other strides than its meta
    torch.manual_seed(0)
    config = {**unet_config(opts.preset), "in_channels": 4, "out_channels": 4, "sample_size": opts.size}
    unet = UNet2DModel(**config).train().to(opts.device, memory_format=CL)
    x = torch.randn(opts.batch_size, 4, opts.size, opts.size, device=opts.device).to(memory_format=CL)
    t = torch.randint(0, 1000, (opts.batch_size,), device=opts.device)
    model = unet if opts.how == "eager" else torch.compile(unet)

    def loss():
        with torch.autocast(opts.device, torch.bfloat16, enabled=opts.bf16):  # as Accelerate: the forward only
            out = model(x, t).sample
        return out.float().square().mean()

    with torch.backends.mkldnn.flags(enabled=False), torch.backends.nnpack.flags(enabled=False):
        loss().backward()  # compiles
        step_loss = loss()
        watch = ConvolutionBackwardCalls()
        with watch:
            step_loss.backward()
    dense = ("CL", "both")
    result = {"how": opts.how, "batch_size": opts.batch_size, "size": opts.size, "calls": len(watch.calls),
              "all_channels_last": sum(all(x in dense for x in call) for call in watch.calls),
              "gradient_or_input_not_channels_last": sum(g not in dense or i not in dense for g, i, _ in watch.calls),
              "nchw_weights": sum(w == "NCHW" for _, _, w in watch.calls),
              "layouts (gradient, input, weight)": {", ".join(k): v for k, v in Counter(watch.calls).most_common()},
              "dtypes (gradient, input, weight)": {", ".join(k): v for k, v in Counter(watch.dtypes).most_common()},
              "gradient shapes of the calls with an NCHW or not dense gradient or input": {
                  "x".join(map(str, shape)): n for shape, n in Counter(
                      s for s, (g, i, _) in zip(watch.shapes, watch.calls) if g not in dense or i not in dense
                  ).most_common()},
              "device": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu", "bf16": opts.bf16,
              "nnpack": False, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
