"""``OUT/best/``: the selected model as a Hub folder whose model card carries the run's results."""

from __future__ import annotations

from pathlib import Path

from ..hub import make_model_card, save_hub_folder


def card_results(results: dict) -> dict:
    """The numeric validation/test metrics of a run (the card's model-index), without per-example counts."""
    return {
        k: float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("validation_", "test_"))
        and not k.endswith("num_examples")
    }


def write_best_model(model, processor, out_dir: Path, results: dict, dataset_name: str, args) -> Path:
    """Merge nothing, save everything: config (with the final stage), weights, code, processor, README.md."""
    metrics = card_results(results)
    system = {"merits-l": "MERITS-L", "mister-e": "MiSTER-E"}[model.config.architecture]
    stages = args.stages_for(model.config.architecture)
    description = (
        f"{system} trained with `train.py` on `{dataset_name}` (stages: {', '.join(stages)}; seed {args.seed}). "
        "Model selection used the validation split only; each test figure was measured once with the selected model. "
        "Keys name split, stage and modality (stage1 = utterance encoders, stage2 = context encoders, "
        "stage3 = co-attention fusion, moe = mixture of experts)."
    )
    card = make_model_card(model.config, results=metrics, dataset_name=dataset_name, description=description)
    return save_hub_folder(model, processor, out_dir, model_card=card)


def push_best_model(folder: Path, hub_model_id: str) -> str:
    """Upload ``folder`` to ``hub_model_id``; a clear error when the Hub cannot be reached."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(hub_model_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=hub_model_id)
    except Exception as error:  # network errors, missing token, ...
        raise RuntimeError(
            f"--push_to_hub: could not upload {folder} to https://huggingface.co/{hub_model_id} "
            f"({type(error).__name__}: {error}). Is the machine online and are you logged in (`hf auth login`)? "
            f"The model is saved locally in {folder}."
        ) from error
    return f"https://huggingface.co/{hub_model_id}"
