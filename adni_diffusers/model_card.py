"""The model card (README.md) of a saved pipeline, rendered from the `pipeline_card.md` template."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = Path(__file__).with_name("pipeline_card.md")


def write_model_card(output_dir, pipe, args, data_source: str, sample_grid=None) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    class_names = pipe.config.class_names or []
    card_data = ModelCardData(
        library_name="diffusers", license="other", pipeline_tag="unconditional-image-generation",
        tags=["medical-imaging", "mri", "brain", "alzheimers", "latent-diffusion", "adni-diffusers"],
    )
    info_path = output_dir / "training_data.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    data_description = ("the synthetic MNI152-based demo set (not ADNI)" if data_source == "demo"
                        else f"{info.get('train', {}).get('images', '?')} slices from the user's data")
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=output_dir.name, data_description=data_description,
        sample_grid=Path(sample_grid).name if sample_grid else "samples.png",
        repo_id=getattr(args, "hub_model_id", None) or output_dir.name, class_names=class_names,
    )
    path = output_dir / "README.md"
    card.save(path)
    return path
