"""container/hparams.py: the one table of training hyperparameters that train.py and bincount's settings read."""

from __future__ import annotations

import typing

from bincount.container import hparams

def test_the_train_settings_are_the_hyperparameter_table():
    from bincount.config import TrainSettings

    fields = TrainSettings.model_fields
    passed = set(TrainSettings(num_workers=2).hyperparameters(5)) - {"num_classes"}  # what reaches train.py
    assert passed == {h.name for h in hparams.HYPERPARAMETERS}  # the others (use_best, wait, ...) steer the command
    for h in hparams.HYPERPARAMETERS:
        field = fields[h.name]
        assert (field.default, field.description) == (h.default, h.help), h.name
        annotation = field.annotation
        if h.choices:
            assert typing.get_origin(annotation) is typing.Literal and typing.get_args(annotation) == h.choices
        else:
            assert h.type in (annotation, *typing.get_args(annotation)), (h.name, annotation)


def test_train_py_takes_every_setting_with_the_same_default_and_value():
    from bincount.backends.local.train import format_args
    from bincount.config import load_settings
    from bincount.container import train

    defaults = vars(train.parse_args([]))
    assert {h.name: defaults[h.name] for h in hparams.HYPERPARAMETERS} == \
        {h.name: h.default for h in hparams.HYPERPARAMETERS}
    changed = {"train.arch": "resnet34", "train.stem": "small", "train.epochs": 3, "train.batch_size": 7,
               "train.lr": 0.02, "train.weight_decay": 0.5, "train.optimizer": "sgd", "train.momentum": 0.5,
               "train.warmup_epochs": 2, "train.label_smoothing": 0.2, "train.count_loss": 0.0,
               "train.ema_decay": 0.0, "train.class_weighting": True, "train.image_size": 64, "train.tta": True,
               "train.patience": 0, "train.num_workers": 3, "train.seed": 9, "train.shuffle_buffer": 5,
               "train.amp": False}
    assert {k.removeprefix("train.") for k in changed} == {h.name for h in hparams.HYPERPARAMETERS} - {"pretrained"}
    settings = load_settings(overrides=changed, environ={})
    hp = settings.train.hyperparameters(4)
    args = vars(train.parse_args(format_args(hp)))
    for key, value in changed.items():
        name = key.removeprefix("train.")
        assert args[name] == value != hparams.BY_NAME[name].default, name  # each one reached train.py, changed


def test_the_choices_are_the_models_net_builds():
    from bincount.container import net

    assert hparams.ARCHS == net.ARCHS and hparams.STEMS == net.STEMS
