"""Export one point of a search's Pareto front as a deployable model (docs/export.md).

    python -m tntsearch.export --experiment NAME [--pick best-accuracy|knee|min-macs]
        [--min-accuracy X] [--max-macs M] [--retrain-epochs N] [--spec SPEC.yaml]
        [--tracking-uri URI] [--registered-model NAME] [--no-mlflow] [--overwrite] OUT_DIR
    python -m tntsearch.export --run-id CHILD_RUN_ID [...] OUT_DIR

One job per module (docs/design.md, module map):

- ``choose``: the pick rules (:func:`pick`) and the knee score;
- ``weights``: the trial's checkpoint (local or remote storage) or a new training run;
- ``formats``: ``config.json``, safetensors, TorchScript, ``torch.export``, ONNX; writing,
  checking against the eager model, loading back (:func:`load_model`);
- ``card``: the model card; ``registry``: logging, registration and the ``champion`` alias;
- ``command``: :func:`export`, the steps in order, and the command line.
"""
from tntsearch.export.command import EXIT_BAD_INPUT, ExportResult, export, main  # first: MLflow telemetry off
from tntsearch.export.card import ALIAS, model_card  # noqa: I001
from tntsearch.export.choose import ACCURACY_METRIC, COST_METRIC, PICK_RULES, knee_scores, pick
from tntsearch.export.formats import FILES, load_model, preprocessing, read_config, verify_export, write_export
from tntsearch.export.registry import log_and_register, promote
from tntsearch.export.weights import find_checkpoint, read_state

__all__ = [
    "PICK_RULES",
    "ACCURACY_METRIC",
    "COST_METRIC",
    "ALIAS",
    "EXIT_BAD_INPUT",
    "FILES",
    "ExportResult",
    "knee_scores",
    "pick",
    "find_checkpoint",
    "read_state",
    "preprocessing",
    "write_export",
    "verify_export",
    "model_card",
    "log_and_register",
    "promote",
    "export",
    "read_config",
    "load_model",
    "main",
]
