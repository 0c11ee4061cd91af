"""adni-diffusers: latent diffusion for brain MRI slices (ADNI AD vs NC) on Hugging Face diffusers."""

__version__ = "0.1.0"

__all__ = ["ADNILatentDiffusionPipeline", "__version__"]


def __getattr__(name):
    # Imported on first use: `import adni_diffusers` stays fast for the CLI and the data tools.
    if name == "ADNILatentDiffusionPipeline":
        from .pipeline_adni_ldm import ADNILatentDiffusionPipeline

        return ADNILatentDiffusionPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
