"""FL4Health 0.4's model checkpointer tests (best, function, save and load) through ``fedckpt.fl4health``,
and the score FL4Health gets wrong: a best score of 0.0."""

import subprocess
import sys

import pytest
from conftest import assert_same_tensors, make_model

from fedckpt.fl4health.checkpointing.checkpointer import (
    BestLossTorchModuleCheckpointer,
    BestMetricTorchModuleCheckpointer,
    FunctionTorchModuleCheckpointer,
)


def test_best_loss_checkpointer(runtime, tmp_path):
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path / "resources"), "best_model.pkl")
    assert checkpointer._should_checkpoint(0.95)  # no best score yet
    checkpointer.best_score = 0.95
    assert not checkpointer._should_checkpoint(1.1)
    assert checkpointer._should_checkpoint(0.87)
    model = make_model(1)
    checkpointer.maybe_checkpoint(model, 0.85, metrics={})
    loaded = checkpointer.load_checkpoint()
    assert type(loaded) is type(model)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_best_metric_checkpointer(runtime, tmp_path):
    model_1, model_2 = make_model(1), make_model(2)
    checkpointer = BestMetricTorchModuleCheckpointer(
        str(tmp_path), "best_model.pkl", metric="dummy_metric", prefix="val - prefix - ", maximize=True
    )
    assert checkpointer._should_checkpoint(0.72)
    checkpointer.best_score = 0.72
    checkpointer.maybe_checkpoint(model_1, -1.0, metrics={"val - prefix - dummy_metric": 0.78})
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), model_1.state_dict())
    checkpointer.maybe_checkpoint(model_2, 100, metrics={"val - prefix - dummy_metric": 0.48, "test": 0.85})
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), model_1.state_dict())
    with pytest.raises(KeyError):
        checkpointer.maybe_checkpoint(model_1, -1.0, metrics={"bad key": 0.78})


def test_default_naming_of_score():
    def score_func_with_name(_: float, metrics: dict) -> float:
        return 1.0

    assert FunctionTorchModuleCheckpointer("", "", score_func_with_name).checkpoint_score_name == "score_func_with_name"


def test_function_checkpointer():
    def score_function(_: float, metrics: dict) -> float:
        return 0.5 * (metrics["accuracy"] + metrics["precision"])

    checkpointer = FunctionTorchModuleCheckpointer("", "", score_function, maximize=True)
    checkpointer.best_score = 0.85
    assert not checkpointer._should_checkpoint(score_function(1.0, {"accuracy": 0.87, "precision": 0.67}))
    assert checkpointer._should_checkpoint(score_function(0.9, {"accuracy": 0.87, "precision": 0.9}))


def test_save_and_load_checkpoint(runtime, tmp_path):
    model_1, model_2 = make_model(1), make_model(2)
    checkpointer = BestMetricTorchModuleCheckpointer(str(tmp_path), "best_model.pkl", "accuracy", maximize=True)
    checkpointer.maybe_checkpoint(model_1, 0.0, {"val - prediction - accuracy": 0.6})
    checkpointer.maybe_checkpoint(model_2, 0.0, {"val - prediction - accuracy": 0.7})
    assert checkpointer.best_score == 0.7
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), model_2.state_dict())


def test_a_best_score_of_zero_is_a_best_score(runtime, tmp_path):
    """FL4Health tests ``if self.best_score:``, so after a loss of 0.0 a worse loss replaces the model."""
    checkpointer = BestLossTorchModuleCheckpointer(str(tmp_path), "best.pt")
    perfect, worse = make_model(1), make_model(2)
    checkpointer.maybe_checkpoint(perfect, 0.0, {})
    assert checkpointer.best_score == 0.0
    assert not checkpointer._should_checkpoint(0.5)
    checkpointer.maybe_checkpoint(worse, 0.5, {})
    assert checkpointer.best_score == 0.0
    assert_same_tensors(checkpointer.load_checkpoint().state_dict(), perfect.state_dict())


def test_importing_the_0_4_api_does_not_import_flower():
    """Flower is becoming an optional extra: only the functions that convert its types import it."""
    script = """
import sys
import fedckpt.fl4health.checkpointing.checkpointer
import fedckpt.fl4health.checkpointing.client_module
import fedckpt.fl4health.checkpointing.server_module
import fedckpt.fl4health.checkpointing.state_checkpointer
import fedckpt.fl4health.utils.snapshotter
import fedckpt.fl4health.parameter_exchange.packing_exchanger
print("flwr" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
