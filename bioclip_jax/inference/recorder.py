"""Prediction logs, as pybioclip's recorder writes them: what was run (the command line), with which model,
pretrained weights, device and settings, on which images, with which prediction arguments.

    classifier = TreeOfLifeClassifier(...)
    attach_prediction_recorder(classifier, note="field trip")      # top-level settings, any keywords
    classifier.predict(["a.jpg"], Rank.SPECIES)                     # every predict call is recorded
    save_recorded_predictions(classifier, "log.json")              # .json: a new JSON file; else appended as text

The content is pybioclip's, field for field; the version field names the program that wrote the log
("bioclip_jax_version" where pybioclip writes "pybioclip_version"), so a provenance chain names the right software.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from datetime import datetime
from typing import Any

from bioclip_jax.errors import InputError

PROGRAM = "bioclip_jax"


def program_version() -> str:
    try:
        return importlib.metadata.version(PROGRAM)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def is_json_file(path: str) -> bool:
    return os.fspath(path).endswith(".json")


def verify_recorder_path(path: str) -> bool | None:
    """A .json log must not exist yet (it is written whole); a text log is appended to. pybioclip's ValueError."""
    if is_json_file(path):
        if os.path.exists(path):
            raise InputError(f"File {path} already exists. Please choose a different file name.")
        return None
    return True


def attach_prediction_recorder(classifier: Any, **top_level_settings) -> "PredictionRecorder":
    """Records the classifier's model and `top_level_settings`, then every later `predict` call; save with
    `save_recorded_predictions`."""
    recorder = PredictionRecorder(classifier, **top_level_settings)
    classifier.set_recorder(recorder)
    return recorder


def save_recorded_predictions(classifier: Any, path: str, include_command_line: bool = True) -> None:
    """Writes the attached recorder's log to `path`: JSON if it ends in .json (which must not exist), else text
    appended. Without a recorder: pybioclip's ValueError."""
    if not classifier.recorder:
        raise InputError("The classifier does not have a recorder attached.")
    command_line = " ".join(sys.argv) if include_command_line else None
    classifier.recorder.create_report(path, command_line=command_line)


def classes_setting(cls: str) -> str:
    """What pybioclip's `predict --log` records for --cls: a file's lines, stripped and comma-joined, or the value
    as given."""
    if os.path.exists(cls):
        with open(cls, encoding="utf-8") as f:
            return ",".join(line.strip() for line in f.readlines())
    return cls


def attach_cli_recorder(classifier: Any, cls: str | None = None, bins_path: str | None = None,
                        subset: str | None = None) -> "PredictionRecorder":
    """`predict --log`: the top-level settings pybioclip's command line records for each mode (--cls, --bins, or
    the tree of life with its embeddings' source and --subset). Call `verify_recorder_path` before loading the
    model and `save_recorded_predictions` after predicting."""
    if cls:
        return attach_prediction_recorder(classifier, classes=classes_setting(cls))
    if bins_path:
        return attach_prediction_recorder(classifier, bins_path=bins_path)
    return attach_prediction_recorder(classifier, tree_of_life_version=classifier.tree_of_life_version,
                                      subset=subset)


class PredictionRecorder:
    """The model, device and settings of one classifier and the predictions made with it."""

    def __init__(self, classifier: Any, **top_level_settings):
        self.model_str = classifier.model_str
        self.pretrained_str = classifier.pretrained_str
        self.device = classifier.device
        self.predictions: list[dict] = []
        self.top_level_settings = top_level_settings
        self.start = datetime.now().isoformat(timespec="seconds")
        self.end = None

    def add_prediction(self, images, **kwargs) -> None:
        self.predictions.append({"images": images, "details": kwargs})
        self.end = datetime.now().isoformat(timespec="seconds")

    def create_report(self, path: str, command_line: str | None) -> None:
        PredictionLogReport(self, command_line).save(path)


class PredictionLogReport:
    """One log in pybioclip's two formats: JSON (machine-readable) or a human-readable text block."""

    def __init__(self, recorder: PredictionRecorder, command_line: str | None):
        self.recorder = recorder
        self.start = recorder.start
        self.end = recorder.end
        self.command_line = command_line

    def create_dictionary(self) -> dict:
        return {
            f"{PROGRAM}_version": program_version(),
            "start": self.start,
            "end": self.end,
            "command_line": self.command_line,
            "model": self.recorder.model_str,
            "pretrained": self.recorder.pretrained_str,
            "device": self.recorder.device,
            "top_level_settings": self.recorder.top_level_settings,
            "predictions": self.recorder.predictions,
        }

    @staticmethod
    def format_key(key: str) -> str:
        return " ".join(word.capitalize() for word in key.split("_"))

    def _lines(self) -> list[str]:
        title = f"** Prediction Log - {PROGRAM} v{program_version()} - {self.start} to {self.end} **"
        lines = ["*" * len(title), title, "*" * len(title)]
        if self.command_line:
            lines.append(f"Command Line: {self.command_line}")
        lines.append(f"Model: {self.recorder.model_str}")
        if self.recorder.pretrained_str:
            lines.append(f"Pretrained: {self.recorder.pretrained_str}")
        lines.append(f"Device: {self.recorder.device}")
        lines += [f"{self.format_key(k)}: {v}" for k, v in self.recorder.top_level_settings.items() if v is not None]
        for prediction in self.recorder.predictions:
            lines += [f"{self.format_key(k)}: {v}" for k, v in prediction["details"].items()]
            lines += ["Images:", "\n".join(prediction["images"])]
        return lines

    def save(self, path: str) -> None:
        """JSON to a new file when `path` ends in .json, else the text block appended (pybioclip's formats)."""
        verify_recorder_path(path)
        if is_json_file(path):
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.create_dictionary(), f, indent=4)
        else:
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n".join(self._lines()) + "\n\n")
