"""sentence-transformers' CrossEncoder settings of a sequence-classification checkpoint: the activation
its scores go through (CrossEncoder.activation_fn), recorded as the config's classifier.score_activation
for Model.rank (pyxf.encoding.rank)."""

import json
import warnings
from pathlib import Path

# The class names (torch.nn) of the activations rank() applies, and pyxf's names for them.
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


def with_score_activation(classifier: dict, files_dir: Path) -> dict:
    """`classifier` (the config's head) with "score_activation" when the checkpoint in `files_dir`
    names one; unchanged when it names none (rank() then applies CrossEncoder's default for one-label
    models, sigmoid)."""
    path = _activation_path(Path(files_dir))
    if path is None:
        return classifier
    name = ACTIVATIONS.get(path.rsplit(".", 1)[-1]) if path.startswith("torch.") else None
    if name is None:
        warnings.warn(f"{files_dir}: the cross-encoder activation {path!r} is not supported; rank() will apply "
                      "sigmoid, and its scores will differ from sentence-transformers'")
        return classifier
    return {**classifier, "score_activation": name}


def _activation_path(files_dir: Path):
    """The dotted class path CrossEncoder would load, looked up where it looks: in a directory it saved
    (modules.json beside it), its own config_sentence_transformers.json; then config.json
    ("sentence_transformers", or before sentence-transformers 4 "sbert_ce_default_activation_function").
    None when none names one."""
    if (files_dir / "modules.json").is_file():
        own = _json_object(files_dir / "config_sentence_transformers.json").get("activation_fn")
        if isinstance(own, str):
            return own
    hf = _json_object(files_dir / "config.json")
    settings = hf.get("sentence_transformers")
    if isinstance(settings, dict) and isinstance(settings.get("activation_fn"), str):
        return settings["activation_fn"]
    legacy = hf.get("sbert_ce_default_activation_function")
    return legacy if isinstance(legacy, str) else None


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return value if isinstance(value, dict) else {}
