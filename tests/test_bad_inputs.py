"""Bad input through every command: exit code 2, one message naming the key or the file, no traceback, and
nothing written. Each row is (id, input, message regex); the messages are located (file:line:column of the
config key) wherever the input came from a config file."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract import bundled_contract_path

runner = CliRunner()
HERE = __name__


# ------------------------------------------------------------------------ user functions a config can name
def raising_factory(**_: object) -> nn.Module:
    raise RuntimeError("factory failed: missing [name]")


def returns_number(**_: object) -> int:
    return 3


def float_label_pairs() -> tuple[TensorDataset, None]:
    return TensorDataset(torch.zeros(4, 2), torch.zeros(4)), None


def empty_pairs() -> tuple[TensorDataset, None]:
    return TensorDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)), None


def linear_without_inputs() -> nn.Module:
    return nn.Linear(3, 2)


def linear_with_wrong_inputs() -> tuple[nn.Module, torch.Tensor]:
    return nn.Linear(3, 2), torch.zeros(4, 5)


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.layer(x)}


def dict_output_model() -> tuple[nn.Module, torch.Tensor]:
    return DictOutput(), torch.zeros(4, 3)


# --------------------------------------------------------------------------------------------- data files
def _npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.savez(path, **arrays)


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text, encoding="utf-8")


def _truncated(path: Path) -> None:
    np.savez(path, x=np.zeros((50, 4)), y=np.arange(50) % 3)
    path.write_bytes(path.read_bytes()[:100])


LABELS = np.arange(50) % 3
FEATURES = np.random.default_rng(0).normal(size=(50, 4))
DATA_FILES: dict[str, Callable[[Path], None]] = {
    "empty.npz": _npz(x=np.zeros((0, 4)), y=np.zeros(0)),
    "one.npz": _npz(x=np.zeros((1, 4)), y=np.zeros(1)),
    "truncated.npz": _truncated,
    "zero-bytes.npz": lambda path: path.write_bytes(b""),
    "single-array.npz": lambda path: path.write_bytes((path.parent / "ok.npy").read_bytes()),
    "pickled.npz": _npz(x=np.array([{"a": 1}] * 50, dtype=object), y=LABELS),
    "inf-labels.npz": _npz(x=FEATURES, y=np.full(50, np.inf)),
    "huge-labels.npz": _npz(x=FEATURES, y=np.full(50, 2e19)),
    "fraction-labels.npz": _npz(x=FEATURES, y=np.full(50, 0.5)),
    "negative-labels.npz": _npz(x=FEATURES, y=-LABELS),
    "string-labels.npz": _npz(x=FEATURES, y=np.array(["a"] * 50)),
    "complex.npz": _npz(x=FEATURES + 1j, y=LABELS),
    "labels-2d.npz": _npz(x=FEATURES, y=np.zeros((50, 2))),
    "flat-x.npz": _npz(x=np.zeros(50), y=LABELS),
    "nan-x.npz": _npz(x=np.full((50, 4), np.nan), y=LABELS),
    "float32-overflow.npz": _npz(x=np.full((50, 4), 1e300), y=LABELS),
    "lengths.npz": _npz(x=FEATURES, y=LABELS[:40]),
    "no-y.npz": _npz(x=FEATURES),
    "test-shape.npz": _npz(x=FEATURES, y=LABELS, x_test=np.zeros((5, 3)), y_test=LABELS[:5]),
    "empty.csv": _text(""),
    "header-only.csv": _text("a,b,y\n"),
    "one-row.csv": _text("a,b,y\n1,2,0\n"),
    "no-feature.csv": _text("y\n" + "".join(f"{i % 2}\n" for i in range(50))),
    "bad-cell.csv": _text("a,y\n1,0\nfoo,1\n2,0\n"),
    "ragged.csv": _text("a,b,y\n1,2,0\n1,1\n"),
    "no-target.csv": _text("a,b,label\n1,2,0\n3,4,1\n"),
    "latin1.csv": lambda path: path.write_bytes(b"a,y\n\xe9,1\n"),
    "table.parquet": _text("not a table"),
    "short.txt": _text("tiny"),
}


def arrays(name: str, extra: str = "") -> str:
    """A config training on one data file; the key ``data_args.path`` sits at line 3, column 3."""
    return f"data: arrays\ndata_args:\n  path: {name}\n{extra}steps: 2\n"


TINY_GPT = "data: text\ndata_args: {path: corpus.txt, block_size: 8}\nmodel: tiny-gpt\n"
PATH_KEY = r"cfg\.yaml:3:3: key 'data_args\.path': "
HOSTILE_YAML = {
    "alias bomb": "".join(
        [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
        + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
    ),
    "recursive alias": "data_args: &a {self: *a}\n",
    "complex key": "? [lr, eps]\n: 1\n",
    "python object tag": "seed: !!python/object/apply:os.system ['echo pwned']\n",
    "python name tag": "model: !!python/name:os.system\n",
}

# (id, config text, message regex): `provetrain train cfg.yaml --output-dir out`.
TRAIN_CONFIGS: list[tuple[str, str, str]] = [
    # the YAML itself
    (
        "alias bomb",
        HOSTILE_YAML["alias bomb"],
        r"cfg\.yaml:1:\d+: key 'l\d[^']*': more than 10,000 YAML nodes .*node budget",
    ),
    ("recursive alias", HOSTILE_YAML["recursive alias"], r"cfg\.yaml:1:12: key 'data_args\.self': recursive alias"),
    ("complex key", HOSTILE_YAML["complex key"], r"cfg\.yaml:1:3: complex key: a list used as a mapping key"),
    (
        "python object tag",
        HOSTILE_YAML["python object tag"],
        r"cfg\.yaml:1:7: key 'seed': the tag '!!python/object/apply:os\.system' builds a Python object",
    ),
    (
        "python name tag",
        HOSTILE_YAML["python name tag"],
        r"cfg\.yaml:1:8: key 'model': the tag '!!python/name:os\.system'",
    ),
    ("unknown tag", "lr: !fast 0.1\n", r"cfg\.yaml:1:5: key 'lr': unknown YAML tag '!fast'"),
    (
        "bad date",
        "output_dir: 2024-13-45\n",
        r"cfg\.yaml:1:13: key 'output_dir': '2024-13-45' is not a valid !!timestamp value",
    ),
    ("unclosed list", "model_args: {hidden: [3\n", r"cfg\.yaml:2:1: invalid YAML"),
    ("empty file", "", r"cfg\.yaml: the config file is empty \(expected a mapping of settings; without a config file"),
    ("only comments", "# nothing here\n", r"cfg\.yaml: the file is empty"),
    ("a list", "- lr: 0.1\n", r"cfg\.yaml:1:1: Input should be a valid dictionary"),
    ("duplicate key", "lr: 0.1\nlr: 0.2\n", r"cfg\.yaml:2:1: key 'lr': duplicate key"),
    # settings
    ("steps: true", "steps: true\n", r"cfg\.yaml:1:8: key 'steps': Input should be a valid integer; got bool True"),
    ("steps: 2.5", "steps: 2.5\n", r"cfg\.yaml:1:8: key 'steps': Input should be a valid integer"),
    ("epochs: yes", "epochs: yes\n", r"cfg\.yaml:1:9: key 'epochs': Input should be a valid integer; got bool True"),
    ("batch_size as text", "batch_size: '64'\n", r"cfg\.yaml:1:13: key 'batch_size': Input should be a valid integer"),
    ("lr: true", "lr: true\n", r"cfg\.yaml:1:5: key 'lr': Input should be a number, not a boolean"),
    ("lr_max: true", "lr_max: true\n", r"cfg\.yaml:1:9: key 'lr_max': Input should be a number, not a boolean"),
    ("betas with a boolean", "betas: [true, 0.9]\n", r"cfg\.yaml:1:9: key 'betas\[0\]': Input should be a number"),
    (
        "seed 2**63",
        "seed: 9223372036854775808\n",
        r"cfg\.yaml:1:7: key 'seed': Input should be less than or equal to 4294967295",
    ),
    ("negative seed", "seed: -1\n", r"cfg\.yaml:1:7: key 'seed': Input should be greater than or equal to 0"),
    ("markup in a value", 'optimizer: "[/x]"\n', r"cfg\.yaml:1:12: key 'optimizer': .*got str '\[/x\]'"),
    ("unknown device", "device: tpu\n", r"cfg\.yaml:1:9: key 'device': Input should be 'auto', 'cpu' or 'cuda'"),
    ("unknown key", "learning_rate: 0.1\n", r"cfg\.yaml:1:1: key 'learning_rate': unknown key"),
    # the settings for real models, several processes and the contract family (issues 12-15)
    *[
        (
            f"{key}: {value}",
            f"steps: 2\n{key}: {value}\n",
            rf"cfg\.yaml:2:\d+: key '{re.escape(key)}[^']*': .*{message}",
        )
        for key, value, message in [
            ("gradient_accumulation_steps", "0", r"Input should be greater than or equal to 1"),
            ("gradient_accumulation_steps", "true", r"Input should be a valid integer; got bool True"),
            ("gradient_accumulation_steps", "1e100", r"Input should be a valid integer; got str '1e100'"),
            (
                "gradient_accumulation_steps",
                "99999999999999999999999",
                r"Input should be less than or equal to 2147483647",
            ),
            ("gradient_accumulation_steps", ".nan", r"Input should be a valid integer; got float nan"),
            ("output_key", "1.5", r"Input should be a valid integer"),
            ("output_key", "[0]", r"Input should be a valid integer; got list"),
            ("output_key", "-1", r"output_key -1 indexes a tuple or list, but the model's output is a Tensor"),
            ("output_key", "''", r"output_key '' is not in the model's output"),
            ("loss_fn", "''", r"loss_fn must be 'module:function', got ''"),
            ("loss_fn", "a:b:c", r"loss_fn must be 'module:function', got 'a:b:c'"),
            ("loss_fn", "nowhere:fn", r"loss_fn 'nowhere:fn': cannot import module 'nowhere'"),
            ("loss_fn", "math:pi", r"module 'math' has no callable 'pi'"),
            ("loss_fn", "builtins:len", r"loss_fn 'builtins:len' fails on the model 'mlp''s outputs .*TypeError"),
            ("compile", "1", r"Input should be a valid boolean; got int 1"),
            ("compile", "'true'", r"Input should be a valid boolean; got str 'true'"),
            ("compile_backend", "3", r"Input should be a valid string"),
            ("weight_decay", "-1", r"Input should be greater than or equal to 0"),
            ("weight_decay", ".inf", r"Input should be a finite number"),
            ("weight_decay", "true", r"Input should be a number, not a boolean"),
            ("no_weight_decay", "'*.bias'", r"Input should be a valid list"),
            ("no_weight_decay", "[1]", r"Input should be a valid string; got int 1"),
            ("no_weight_decay", "['']", r"no_weight_decay pattern '' matches no trainable parameter of the model"),
            (
                "no_weight_decay",
                "['*.bais']",
                r"pattern '\*\.bais' matches no trainable parameter .*\(1\.weight, 1\.bias",
            ),
            ("decay_steps", "0", r"Input should be greater than or equal to 1"),
            ("decay_steps", ".inf", r"Input should be a valid integer; got float inf"),
            ("min_lr", ".nan", r"Input should be greater than or equal to 0; got float nan"),
            ("min_lr", "1.0", r"min_lr \(1\.0\) must be below lr \(0\.001\)"),
            ("lr_max_budget", "[]", r"Input should be a valid dictionary"),
            ("lr_max_budget", "{hvp: 0}", r"Input should be greater than or equal to 1"),
            ("lr_max_budget", "{seconds: .inf}", r"Input should be a finite number"),
            ("lr_max_budget", "{curvature_batches: true}", r"Input should be a valid integer; got bool True"),
            ("lr_max_budget", "{foo: 1}", r"unknown key \(expected one of the keys hvp, seconds, batches"),
            ("strategy", "fsdp2", r"Input should be 'ddp' or 'fsdp'"),
            (
                "activation_checkpointing",
                "3",
                r"not a setting of activation_checkpointing; got int 3 \(expected 'module_lists'",
            ),
            ("activation_checkpointing", "true", r"not a setting of activation_checkpointing; got bool True"),
            ("activation_checkpointing", "[]", r"not a setting of activation_checkpointing; got list \[\]"),
            (
                "activation_checkpointing",
                "nonsense",
                r"got str 'nonsense' \(expected 'module_lists' or a non-empty list",
            ),
            ("activation_checkpointing", "['zzz.*']", r"patterns \['zzz\.\*'\] selects no submodule"),
            ("strategy", "null", r"Input should be 'ddp' or 'fsdp'; got NoneType None"),
            ("contracts", "[]", r"List should have at least 1 item"),
            ("contracts", "nope-v1", r"Input should be a valid list"),
            ("contracts", "[nope-v1]", r"'nope-v1' is neither a contract file nor a bundled contract"),
            ("contracts", "[null]", r"Input should be a valid string"),
            (
                "contracts",
                "[/dev/null]",
                r"the contract does not load: /dev/null: the contract file is not a regular file",
            ),
            ("contracts", "[cfg.yaml]", r"the contract does not load: cfg\.yaml:1:1: key 'metadata': required key"),
            ("contracts", "[ok.npz]", r"the contract does not load: ok\.npz: not UTF-8 text"),
            ("eval_batches", "0", r"Input should be greater than or equal to 1"),
            ("eval_batches", "'3'", r"Input should be a valid integer; got str '3'"),
            ("momentum", "0.9", r"momentum is a setting of optimizer: sgd, not of adamw"),
            ("nesterov", "true", r"nesterov is a setting of optimizer: sgd, not of adamw"),
            ("epochs", "3", r"give only one of steps or epochs"),
            ("collective_timeout_minutes", "true", r"Input should be a number, not a boolean"),
            ("collective_timeout_minutes", "0", r"Input should be greater than 0"),
            ("output_dir", "''", r"String should have at least 1 character"),
            ("batch_size", "99999999999", r"Input should be less than or equal to 2147483647"),
        ]
    ],
    *[
        (f"sgd {key}: {value}", f"optimizer: sgd\n{key}: {value}\n", rf"cfg\.yaml:2:\d+: key '{key}': {message}")
        for key, value, message in [
            ("momentum", "-0.1", r"Input should be greater than or equal to 0"),
            ("momentum", "1", r"Input should be less than 1"),
            ("momentum", ".nan", r"Input should be a finite number"),
            ("momentum", "true", r"Input should be a number, not a boolean"),
            ("momentum", "null", r"Input should be a valid number"),
            ("nesterov", "true", r"nesterov: true needs momentum > 0"),
            ("nesterov", "1", r"Input should be a valid boolean; got int 1"),
            ("betas", "[0.8, 0.9]", r"betas is a setting of Adam and AdamW, not of optimizer: sgd"),
            ("eps", "1.0e-6", r"eps is a setting of Adam and AdamW, not of optimizer: sgd"),
        ]
    ],
    # data files
    ("no such data file", arrays("missing.npz"), PATH_KEY + r"data file missing\.npz does not exist"),
    ("empty npz", arrays("empty.npz"), PATH_KEY + r"empty\.npz: x holds no examples"),
    ("one-row npz", arrays("one.npz"), PATH_KEY + r"one\.npz: 1 example\(s\); at least 2 are needed"),
    ("truncated npz", arrays("truncated.npz"), PATH_KEY + r"truncated\.npz: cannot read it as an \.npz archive"),
    ("zero-byte npz", arrays("zero-bytes.npz"), PATH_KEY + r"zero-bytes\.npz: cannot read it as an \.npz archive"),
    (
        "single array in an npz",
        arrays("single-array.npz"),
        PATH_KEY + r"single-array\.npz: holds a single array \(\.npy\), not named arrays",
    ),
    (
        "object array npz",
        arrays("pickled.npz"),
        PATH_KEY + r"pickled\.npz: cannot read it as an \.npz archive \(Object arrays cannot be loaded",
    ),
    ("inf labels", arrays("inf-labels.npz"), PATH_KEY + r"inf-labels\.npz: labels must be non-negative integers"),
    ("2e19 labels", arrays("huge-labels.npz"), PATH_KEY + r"huge-labels\.npz: label 2e\+19 is not a class index"),
    (
        "fractional labels",
        arrays("fraction-labels.npz"),
        PATH_KEY + r"fraction-labels\.npz: labels must be non-negative integers",
    ),
    ("negative labels", arrays("negative-labels.npz"), PATH_KEY + r"negative-labels\.npz: labels must be non-negative"),
    (
        "string labels",
        arrays("string-labels.npz"),
        PATH_KEY + r"string-labels\.npz: y has dtype <U1; it must hold numbers",
    ),
    ("complex features", arrays("complex.npz"), PATH_KEY + r"complex\.npz: x is complex; features must be real"),
    (
        "2-d labels",
        arrays("labels-2d.npz"),
        PATH_KEY + r"labels-2d\.npz: y has shape \(50, 2\); expected \(examples,\)",
    ),
    (
        "1-d features",
        arrays("flat-x.npz"),
        PATH_KEY + r"flat-x\.npz: x has shape \(50,\); expected \(examples, features",
    ),
    ("NaN features", arrays("nan-x.npz"), PATH_KEY + r"nan-x\.npz: inputs hold NaN or Inf"),
    (
        "features beyond float32",
        arrays("float32-overflow.npz"),
        PATH_KEY + r"float32-overflow\.npz: inputs hold NaN or Inf values \(or values beyond float32",
    ),
    ("inputs and labels differ", arrays("lengths.npz"), PATH_KEY + r"lengths\.npz: 50 inputs but 40 labels"),
    ("npz without y", arrays("no-y.npz"), PATH_KEY + r"no-y\.npz: missing arrays \['y'\]"),
    (
        "x_test of another shape",
        arrays("test-shape.npz"),
        PATH_KEY + r"test-shape\.npz: x_test has examples of shape \(3,\), x of \(4,\)",
    ),
    ("empty csv", arrays("empty.csv"), PATH_KEY + r"empty\.csv: no header row"),
    ("header-only csv", arrays("header-only.csv"), PATH_KEY + r"header-only\.csv: a header but no data rows"),
    ("one-row csv", arrays("one-row.csv"), PATH_KEY + r"one-row\.csv: 1 example\(s\)"),
    ("csv without features", arrays("no-feature.csv"), PATH_KEY + r"no-feature\.csv: only the target column 'y'"),
    ("csv cell not a number", arrays("bad-cell.csv"), PATH_KEY + r"bad-cell\.csv: line 3: 'foo' is not a number"),
    ("ragged csv", arrays("ragged.csv"), PATH_KEY + r"ragged\.csv: line 3: 2 values, but the header names 3 columns"),
    ("csv not UTF-8", arrays("latin1.csv"), PATH_KEY + r"latin1\.csv: not UTF-8 text"),
    (
        "csv without the target",
        arrays("no-target.csv"),
        r"cfg\.yaml:2:1: key 'data_args\.target': no-target\.csv: no column named 'y'; columns are \['a', 'b', 'label",
    ),
    (
        "unsupported file type",
        arrays("table.parquet"),
        PATH_KEY + r"table\.parquet: unsupported data file type '\.parquet'",
    ),
    # data arguments and sources
    (
        "path not a string",
        "data: arrays\ndata_args: {path: 5}\n",
        r"cfg\.yaml:2:13: key 'data_args\.path': path must be a file name, got 5",
    ),
    (
        "arrays without a path",
        "data: arrays\n",
        r"cfg\.yaml:1:1: key 'data_args\.path': data 'arrays' needs the argument 'path'",
    ),
    (
        "test_fraction 2",
        "data_args: {test_fraction: 2}\n",
        r"cfg\.yaml:1:13: key 'data_args\.test_fraction': test_fraction must be a number in \(0, 1\), got 2",
    ),
    (
        "test_fraction true",
        "data_args: {test_fraction: true}\n",
        r"cfg\.yaml:1:13: key 'data_args\.test_fraction': test_fraction must be a number in \(0, 1\), got True",
    ),
    (
        "unknown data argument",
        "data_args: {shuffle: true}\n",
        r"cfg\.yaml:1:13: key 'data_args\.shuffle': data 'digits' has no argument 'shuffle'; its arguments are test_fr",
    ),
    (
        "seed as a data argument",
        "data_args: {seed: 3}\n",
        r"cfg\.yaml:1:13: key 'data_args\.seed': data 'digits' has no argument 'seed'",
    ),
    (
        "text block_size 0",
        "data: text\ndata_args: {path: short.txt, block_size: 0}\n",
        r"cfg\.yaml:2:30: key 'data_args\.block_size': block_size must be an integer >= 1, got 0",
    ),
    (
        "text too short",
        "data: text\ndata_args: {path: short.txt, block_size: 8}\n",
        r"cfg\.yaml:2:13: key 'data_args\.path': short\.txt: 4 characters is too short for block_size 8",
    ),
    (
        "unknown data",
        "data: imagenet\n",
        r"cfg\.yaml:1:1: key 'data': data 'imagenet' is neither a built-in nor of the form 'module:function'",
    ),
    (
        "data module missing",
        "data: nowhere_at_all:load\n",
        r"cfg\.yaml:1:1: key 'data': data 'nowhere_at_all:load': cannot import module 'nowhere_at_all'",
    ),
    (
        "data function raises",
        f"data: {HERE}:raising_factory\n",
        r"cfg\.yaml:1:1: key 'data': data function '.*:raising_factory' raised RuntimeError: factory failed: "
        r"missing \[name\]",
    ),
    (
        "data function returns a number",
        f"data: {HERE}:returns_number\n",
        r"cfg\.yaml:1:1: key 'data': data function .* returned int; expected DataSplits, a Dataset, "
        r"IterableDataset or DataLoader, or a \(train, test\) pair",
    ),
    (
        "data function float labels",
        f"data: {HERE}:float_label_pairs\n",
        r"cfg\.yaml:1:1: key 'data': .*its train set has labels of dtype torch\.float32",
    ),
    (
        "data function no examples",
        f"data: {HERE}:empty_pairs\n",
        r"cfg\.yaml:1:1: key 'data': .*its train set has inputs of shape \(0, 2\)",
    ),
    # model arguments and factories
    (
        "hidden: [-5]",
        "model_args:\n  hidden: [-5]\n",
        r"cfg\.yaml:2:12: key 'model_args\.hidden\[0\]': hidden\[0\] must be an integer >= 1, got -5",
    ),
    (
        "hidden: [0]",
        "model_args: {hidden: [64, 0]}\n",
        r"cfg\.yaml:1:27: key 'model_args\.hidden\[1\]': hidden\[1\] must be an integer >= 1, got 0",
    ),
    (
        "hidden: [true]",
        "model_args: {hidden: [true]}\n",
        r"cfg\.yaml:1:23: key 'model_args\.hidden\[0\]': hidden\[0\] must be an integer >= 1, got True",
    ),
    (
        "hidden: 64",
        "model_args: {hidden: 64}\n",
        r"cfg\.yaml:1:14: key 'model_args\.hidden': hidden must be a list of layer widths, got 64",
    ),
    (
        "hidden: 10**12",
        "model_args: {hidden: [1000000000000]}\n",
        r"cfg\.yaml:1:1: key 'model_args': building the model 'mlp' failed \(RuntimeError: .*can't allocate memory",
    ),
    (
        "unknown model argument",
        "model_args: {depth: 3}\n",
        r"cfg\.yaml:1:14: key 'model_args\.depth': model 'mlp' has no argument 'depth'; its arguments are hidden",
    ),
    (
        "cnn channels: 0",
        "model: cnn\nmodel_args: {channels: 0}\n",
        r"cfg\.yaml:2:14: key 'model_args\.channels': channels must be an integer >= 1, got 0",
    ),
    (
        "cnn on non-square data",
        f"model: cnn\n{arrays('one-row.csv')}".replace("one-row.csv", "ok.npz"),
        r"cfg\.yaml:1:1: key 'model': cnn needs square single-channel images; input shape \(3,\) is not",
    ),
    (
        "heads: 0",
        TINY_GPT + "model_args: {heads: 0}\n",
        r"cfg\.yaml:4:14: key 'model_args\.heads': heads must be an integer >= 1, got 0",
    ),
    (
        "heads not dividing width",
        TINY_GPT + "model_args: {width: 10, heads: 3}\n",
        r"cfg\.yaml:4:25: key 'model_args\.heads': width 10 must be divisible by heads 3",
    ),
    (
        "width: 0",
        TINY_GPT + "model_args: {width: 0}\n",
        r"cfg\.yaml:4:14: key 'model_args\.width': width must be an integer >= 1, got 0",
    ),
    (
        "tiny-gpt on images",
        "model: tiny-gpt\n",
        r"cfg\.yaml:1:1: key 'model': the model 'tiny-gpt' does not run on the data 'digits' .*RuntimeError: Expected",
    ),
    ("unknown model", "model: resnet\n", r"cfg\.yaml:1:1: key 'model': model 'resnet' is neither a built-in"),
    (
        "model attribute missing",
        "model: torch.nn:NoSuchLayer\n",
        r"cfg\.yaml:1:1: key 'model': .*has no callable 'NoSuchLayer'",
    ),
    (
        "model factory raises",
        f"model: {HERE}:raising_factory\n",
        r"cfg\.yaml:1:1: key 'model': model function '.*:raising_factory' raised RuntimeError: factory failed: "
        r"missing \[name\]",
    ),
    (
        "model factory returns a number",
        f"model: {HERE}:returns_number\n",
        r"cfg\.yaml:1:1: key 'model': model function .* returned int; expected a torch\.nn\.Module",
    ),
    (
        "model factory bad arguments",
        "model: torch.nn:Linear\nmodel_args: {inputs: 3}\n",
        r"cfg\.yaml:1:1: key 'model': model function 'torch\.nn:Linear' raised TypeError",
    ),
    (
        "model does not fit the data",
        "model: torch.nn:Linear\nmodel_args: {in_features: 3, out_features: 10}\n",
        r"cfg\.yaml:1:1: key 'model': the model 'torch\.nn:Linear' does not run on the data 'digits' "
        r"\(examples of shape \(64,\), 10 classes\): RuntimeError",
    ),
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "ok.npy", np.zeros(3))
    for name, write in DATA_FILES.items():
        write(tmp_path / name)
    np.savez(tmp_path / "ok.npz", x=np.zeros((50, 3)), y=LABELS)
    (tmp_path / "corpus.txt").write_text("the contract holds at every step; " * 10, encoding="utf-8")
    return tmp_path


def _assert_refused(result, pattern: str, workdir: Path) -> None:
    output = result.output + (result.stderr or "")
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # raised by the CLI, not escaped
    assert "Traceback" not in output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]  # one message
    assert re.search(pattern, line), line
    assert not (workdir / "out").exists() and not (workdir / "runs").exists()


@pytest.mark.parametrize(("text", "pattern"), [row[1:] for row in TRAIN_CONFIGS], ids=[r[0] for r in TRAIN_CONFIGS])
def test_train_refuses_a_bad_config(workdir: Path, text: str, pattern: str) -> None:
    (workdir / "cfg.yaml").write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["train", "cfg.yaml", "--quiet", "--output-dir", "out"])
    _assert_refused(result, r"^error: " + pattern, workdir)


LR_MAX_ROWS = ["alias bomb", "steps: true", "2e19 labels", "hidden: [-5]", "model factory raises", "empty file"]


def test_an_output_dir_that_is_a_file_is_located_in_the_config(workdir: Path) -> None:
    (workdir / "cfg.yaml").write_text("steps: 2\noutput_dir: ok.npz/run\n")
    result = runner.invoke(app, ["train", "cfg.yaml"])
    _assert_refused(result, r"^error: cfg\.yaml:2:1: key 'output_dir': ok\.npz is a file", workdir)


@pytest.mark.parametrize("row", LR_MAX_ROWS)
def test_lr_max_refuses_a_bad_config(workdir: Path, row: str) -> None:
    (_, text, pattern) = next(r for r in TRAIN_CONFIGS if r[0] == row)
    (workdir / "cfg.yaml").write_text(text, encoding="utf-8")
    _assert_refused(runner.invoke(app, ["lr-max", "cfg.yaml"]), r"^error: " + pattern, workdir)


# (id, argv, message regex) for the commands that take options rather than a config.
COMMANDS: list[tuple[str, list[str], str]] = [
    (
        "train: missing config",
        ["train", "nope.yaml", "--output-dir", "out"],
        r"nope\.yaml: cannot read the config file",
    ),
    ("train: config is a directory", ["train", ".", "--output-dir", "out"], r"^error: \.: cannot read the config file"),
    ("train: --device tpu", ["train", "--device", "tpu", "--output-dir", "out"], r"Invalid value for '--device'"),
    ("train: --seed -1", ["train", "--seed", "-1", "--output-dir", "out"], r"Invalid value for '--seed'"),
    ("train: --seed 2**63", ["train", "--seed", str(2**63), "--output-dir", "out"], r"Invalid value for '--seed'"),
    (
        "train: --output-dir a file",
        ["train", "--output-dir", "ok.npz"],
        r"^error: <config>: key 'output_dir': ok\.npz is a file, so the run directory ok\.npz cannot be created",
    ),
    (
        "train: --output-dir under a file",
        ["train", "--output-dir", "ok.npz/run"],
        r"^error: <config>: key 'output_dir': ok\.npz is a file, so the run directory ok\.npz/run cannot",
    ),
    ("train: --steps 0", ["train", "--steps", "0", "--output-dir", "out"], r"Invalid value for '--steps'"),
    (
        "verify: --json a directory",
        ["verify", "--json", "."],
        r"^error: --json \. is a directory; give the name of a file",
    ),
    (
        "verify: factory raises",
        ["verify", "--model", f"{HERE}:raising_factory"],
        r"^error: model function .* raised RuntimeError: factory failed: missing \[name\]",
    ),
    (
        "verify: factory returns a number",
        ["verify", "--model", f"{HERE}:returns_number"],
        r"^error: model '.*:returns_number' returned int; expected a torch\.nn\.Module",
    ),
    (
        "verify: no input shape",
        ["verify", "--model", f"{HERE}:linear_without_inputs"],
        r"^error: .* returned only a model: give --input-shape",
    ),
    (
        "verify: bad input shape",
        ["verify", "--model", f"{HERE}:linear_without_inputs", "--input-shape", "8,x"],
        r"^error: --input-shape '8,x': expected positive integers",
    ),
    (
        "verify: zero input shape",
        ["verify", "--model", f"{HERE}:linear_without_inputs", "--input-shape", "0,3"],
        r"^error: --input-shape '0,3'",
    ),
    (
        "verify: inputs do not fit",
        ["verify", "--model", f"{HERE}:linear_with_wrong_inputs"],
        r"^error: model .* does not run on inputs of shape \(4, 5\): RuntimeError",
    ),
    (
        "verify: outputs not logits",
        ["verify", "--model", f"{HERE}:dict_output_model"],
        r"^error: verify trains the model as a classifier: .* it returned dict",
    ),
    (
        "verify: module missing",
        ["verify", "--model", "nowhere_at_all:make"],
        r"^error: model 'nowhere_at_all:make': cannot import module",
    ),
    (
        "parity: factory raises",
        ["parity", "--model", f"{HERE}:raising_factory"],
        r"^error: model function .* raised RuntimeError: factory failed: missing \[name\]",
    ),
    (
        "parity: bad input shape",
        ["parity", "--model", "torch.nn:Identity", "--input-shape", "-1,3"],
        r"^error: --input-shape '-1,3'",
    ),
    (
        "parity: inputs do not fit",
        ["parity", "--model", f"{HERE}:linear_with_wrong_inputs"],
        r"^error: model .* does not run on inputs of shape \(4, 5\)",
    ),
    ("prove: resource limit 0", ["prove", "--bound", "1", "--rlimit", "0"], r"Invalid value for '--rlimit'"),
    ("prove: a timeout is not a resource limit", ["prove", "--timeout", "60"], r"No such option: --timeout"),
    ("prove: bound 0", ["prove", "--bound", "0"], r"Invalid value for '--bound'"),
]


@pytest.mark.parametrize(("argv", "pattern"), [row[1:] for row in COMMANDS], ids=[r[0] for r in COMMANDS])
def test_command_refuses_a_bad_option(workdir: Path, argv: list[str], pattern: str) -> None:
    result = runner.invoke(app, argv)
    output = result.output + (result.stderr or "")
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert re.search(pattern, result.stderr, flags=re.M), result.stderr
    assert not (workdir / "out").exists() and not (workdir / "runs").exists()
    assert sorted(p.name for p in workdir.iterdir()) == sorted([*DATA_FILES, "ok.npy", "ok.npz", "corpus.txt"])


@pytest.mark.parametrize("row", sorted(HOSTILE_YAML))
@pytest.mark.parametrize("command", ["status", "audit"])
def test_contract_commands_refuse_hostile_yaml(workdir: Path, row: str, command: str) -> None:
    (workdir / "contract.yaml").write_text(HOSTILE_YAML[row], encoding="utf-8")
    result = runner.invoke(app, ["contract", command, "contract.yaml"])
    output = result.output + (result.stderr or "")
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    assert re.match(r"error: contract\.yaml:\d+:\d+: ", result.stderr), result.stderr


def test_contract_commands_refuse_an_empty_file(workdir: Path) -> None:
    (workdir / "contract.yaml").write_text("")
    result = runner.invoke(app, ["contract", "status", "contract.yaml"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: contract.yaml: the file is empty")


# ------------------------------------------------------------------------------- markup in user text
def test_markup_in_a_clause_text_is_printed_as_written(workdir: Path) -> None:
    text = bundled_contract_path().read_text(encoding="utf-8").replace('"lr < lr_max"', '"lr < [/x] [name]"')
    (workdir / "contract.yaml").write_text(text, encoding="utf-8")
    status = runner.invoke(app, ["contract", "status", "contract.yaml"])
    assert status.exit_code == 0, status.output
    assert "lr < [/x] [name]" in status.stdout
    audit = runner.invoke(app, ["contract", "audit", "contract.yaml"])
    assert audit.exit_code == 1, audit.output
    assert "UNBOUND loss_decrease.preconditions[1] `lr < [/x] [name]`" in audit.stdout


def test_markup_in_the_output_dir_is_printed_as_written(workdir: Path) -> None:
    result = runner.invoke(app, ["train", "--steps", "2", "--quiet", "--output-dir", "o[/x]"])
    assert result.exit_code == 0, result.output
    assert "outputs: o[/x]/ (metrics.jsonl" in result.stdout
    assert (workdir / "o[/x]" / "certificate.json").is_file()


def test_an_override_on_the_python_side_is_checked(workdir: Path) -> None:
    from provetrain.errors import ConfigError
    from provetrain.train.config import load_config
    from provetrain.train.run import prepare_trainer

    (workdir / "cfg.yaml").write_text("steps: 2\nseed: 3\n")
    with pytest.raises(
        ConfigError, match=re.escape("<config>: key 'seed': Input should be greater than or equal to 0")
    ):
        prepare_trainer(load_config("cfg.yaml"), seed=-1)


@pytest.mark.parametrize("argv", [["train", "bomb.yaml"], ["lr-max", "bomb.yaml"], ["contract", "audit", "bomb.yaml"]])
def test_an_alias_bomb_ends_a_real_process_at_once(workdir: Path, argv: list[str]) -> None:
    """Twelve levels of nine (2.8e11 nodes); before the node budget, six levels took minutes."""
    levels = [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 12)]
    (workdir / "bomb.yaml").write_text("".join(levels), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "provetrain", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "node budget" in done.stderr and "Traceback" not in done.stderr
    assert not (workdir / "runs").exists()


# ----------------------------------------------------------------------- contract files that are not ones
CONTRACT_FILES: list[tuple[str, Callable[[Path], None] | None, str]] = [
    ("missing", None, r"cannot read the contract file: No such file or directory"),
    ("a directory", lambda path: path.mkdir(), r"cannot read the contract file: Is a directory"),
    ("empty", lambda path: path.write_text(""), r"the file is empty"),
    ("binary", lambda path: path.write_bytes(bytes(range(256)) * 8), r"not UTF-8 text"),
    ("a device", lambda path: path.symlink_to("/dev/zero"), r"the contract file is not a regular file"),
    ("a list", lambda path: path.write_text("- a\n- b\n"), r"Input should be a valid dictionary .*got list"),
    ("a scalar", lambda path: path.write_text("just words\n"), r"Input should be a valid dictionary .*got str"),
    (
        "10 MB",
        lambda path: path.write_text("metadata:\n" + "".join(f"  k{i}: {'x' * 90}\n" for i in range(110_000))),
        r"the contract file is \d+\.\d MB, too large to be one",
    ),
]


@pytest.mark.parametrize(("write", "pattern"), [r[1:] for r in CONTRACT_FILES], ids=[r[0] for r in CONTRACT_FILES])
@pytest.mark.parametrize("command", ["status", "audit", "lint"])
def test_contract_commands_refuse_what_is_not_a_contract(
    workdir: Path, command: str, write: Callable[[Path], None] | None, pattern: str
) -> None:
    if write is not None:
        write(workdir / "c.yaml")
    result = runner.invoke(app, ["contract", command, "c.yaml"])
    output = result.output + (result.stderr or "")
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output
    assert re.match(r"error: c\.yaml" + r"[:\d]*: " + ".*" + pattern, result.stderr), result.stderr


# ------------------------------------------------------------------------------- --resume at garbage
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of the default job (step 2), to tamper with."""
    run = tmp_path_factory.mktemp("real") / "run"
    result = runner.invoke(app, ["train", "--steps", "2", "--quiet", "--output-dir", str(run)])
    assert result.exit_code == 0, result.output
    return run / "checkpoints" / "step-2"


def _tampered(checkpoint: Path, target: Path, **state: object) -> Path:
    """A copy of ``checkpoint`` with state.json entries replaced (``None``: removed), its manifest updated
    so that only the content is wrong."""
    import hashlib
    import json
    import shutil

    shutil.copytree(checkpoint, target)
    saved = json.loads((target / "state.json").read_text())
    for key, value in state.items():
        saved.pop(key) if value is None else saved.__setitem__(key, value)
    text = json.dumps(saved) if "whole" not in state else json.dumps(state["whole"])
    (target / "state.json").write_text(text)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["state.json"] = {"bytes": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


RESUMES: list[tuple[str, dict[str, object], str]] = [
    ("missing", {}, r"checkpoint directory nowhere does not exist"),
    ("a file", {}, r"checkpoint directory ok\.npz is a file, not a directory"),
    ("an empty directory", {}, r"no checkpoint in .*: it holds no step-<N> directory"),
    ("step-x", {}, r"a checkpoint is named step-<N> with N a number"),
    ("state a list", {"whole": [1, 2]}, r"state\.json holds list, not a mapping"),
    ("no config", {"config": None}, r"state\.json has no entry 'config'"),
    ("config a list", {"config": [1]}, r"state\.json: config is list, not a mapping"),
    ("no rng", {"rng": None}, r"state\.json has no entry 'rng'"),
    ("rng garbage", {"rng": {"torch": "zz"}}, r"RNG state lacks"),
    ("estimate garbage", {"lr_max_estimate": {"x": 1}}, r"state\.json has no entry 'lr_max'"),
    ("lr_scale NaN", {"lr_scale": "NaN"}, r"lr_scale is 'NaN', not in \(0, 1\]"),
]


def test_a_checkpoint_older_than_the_decay_groups_names_the_setting_to_resume_it(
    workdir: Path, checkpoint: Path
) -> None:
    """A checkpoint saved before gradient_accumulation_steps and no_weight_decay existed had no
    accumulation and decayed every parameter: only the setting that differs from that is named."""
    import json

    config = json.loads((checkpoint / "state.json").read_text())["config"]
    del config["gradient_accumulation_steps"], config["no_weight_decay"]
    target = _tampered(checkpoint, workdir / "old" / "step-2", config=config)
    result = runner.invoke(app, ["train", "--steps", "4", "--quiet", "--output-dir", "out", "--resume", str(target)])
    assert result.exit_code == 2, result.output
    assert re.search(r"its run used different no_weight_decay \(no_weight_decay=\[\]; this run has", result.stderr)
    assert "gradient_accumulation_steps" not in result.stderr


@pytest.mark.parametrize(("state", "pattern"), [r[1:] for r in RESUMES], ids=[r[0] for r in RESUMES])
def test_resume_refuses_garbage(
    workdir: Path, checkpoint: Path, request: pytest.FixtureRequest, state: dict[str, object], pattern: str
) -> None:
    name = request.node.callspec.id
    target = {"missing": "nowhere", "a file": "ok.npz", "an empty directory": "empty", "step-x": "run/step-x"}.get(name)
    if target is None:
        target = str(_tampered(checkpoint, workdir / "tampered" / "step-2", **state))
    elif name == "an empty directory":
        (workdir / "empty").mkdir()
    elif name == "step-x":
        (workdir / "run" / "step-x").mkdir(parents=True)
    result = runner.invoke(app, ["train", "--steps", "4", "--quiet", "--output-dir", "out", "--resume", target])
    output = result.output + (result.stderr or "")
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output
    assert re.search(r"^error: cannot resume from .*" + pattern, result.stderr), result.stderr
    assert not (workdir / "out").exists() and not (workdir / "runs").exists()
