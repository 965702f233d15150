"""Evaluation: accuracy at input resolutions never seen in training, and the built-in demo that shows it.

`s4nd_vision.eval.resolution` evaluates any models (ours or plain timm ones) at a list of resolutions;
`s4nd_vision.eval.demo` trains a pair of models on built-in data and evaluates them with it.
"""
from .demo import SETTINGS, DemoSetting, retention, run_demo
from .resolution import (
    CSV_NAME,
    PLOT_NAME,
    check_resolutions,
    dataset_num_classes,
    eval_resolution,
    format_table,
    load_model,
    min_input_size,
    plot_accuracy,
    write_csv,
)
