"""flags.py: one definition makes both the absl flags and the config; bad values are one line, in process."""

import dataclasses

import pytest
from absl import flags

from horovod_mlstm.flags import CommonConfig, TrainConfig, define_common, define_training

pytestmark = pytest.mark.unit


def parse(*argv: str, config=TrainConfig, define=define_training):
    """The config train.py would build from this command line, parsed in a fresh flag set."""
    flag_values = flags.FlagValues()
    define(flag_values)
    flag_values(["train.py", *argv])
    return config.from_flags(flag_values)


def test_every_field_is_a_flag_with_its_default_and_help():
    flag_values = flags.FlagValues()
    define_training(flag_values)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(fields) == set(flag_values)
    for name, field in fields.items():
        default = flag_values[name].default
        assert (tuple(default) if isinstance(default, list) else default) == field.default, name
        assert flag_values[name].help.endswith(field.metadata["help"])  # an enum's help starts with its choices
    assert parse() == TrainConfig()


def test_values_arrive_typed():
    cfg = parse("--hidden_size=32", "--milestone_chars=3e6,1e6,1e6", "--xla", "--precision=mixed_bfloat16")
    assert cfg.hidden_size == 32 and cfg.milestone_chars == (1_000_000, 3_000_000) and cfg.xla
    assert cfg.model_config().precision == "mixed_bfloat16"


@pytest.mark.parametrize("args, message", [
    (["--warmup_steps=50", "--train_steps=10"], "--warmup_steps (50) must be below the decay horizon"),
    (["--batch_size_per_worker=0"], "--batch_size_per_worker must be at least 1, got 0"),
    (["--cycle_time_ms=-1"], "--cycle_time_ms must be a finite number >= 0"),
    (["--cycle_time_ms=nan"], "--cycle_time_ms must be a finite number >= 0"),
    (["--clip_norm=inf"], "--clip_norm must be a finite number >= 0"),
    (["--learning_rate=0"], "--learning_rate must be a positive number"),
    (["--adam_beta2=1"], "--adam_beta1 and --adam_beta2 must be in [0, 1)"),
    (["--milestone_chars=1e6,lots"], "--milestone_chars must be numbers of characters"),
    (["--milestone_chars=0"], "--milestone_chars must be positive"),
    (["--model_dir="], "--model_dir must not be empty"),
    (["--gradient_reduction=adasum", "--elastic"], "--gradient_reduction=adasum does not work with --elastic"),
])
def test_inconsistent_settings_are_one_line(args, message):
    with pytest.raises(ValueError) as error:
        parse(*args)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--precision=fp8"], "precision"),
    (["--gradient_reduction=sum"], "gradient_reduction"),
    (["--hidden_size=many"], "hidden_size"),
])
def test_unparsable_flags_are_refused_by_absl(args, message):
    with pytest.raises(flags.Error, match=message):
        parse(*args)


def test_the_common_flags_are_the_training_configs_first_fields():
    common = parse("--seq_length=64", config=CommonConfig, define=define_common)
    assert common.seq_length == 64 and common.data_path == "data/builtin"
    assert [f.name for f in dataclasses.fields(CommonConfig)] == \
        [f.name for f in dataclasses.fields(TrainConfig)][:len(dataclasses.fields(CommonConfig))]
    with pytest.raises(ValueError, match="--intra_op_threads must be a finite number >= 0"):
        parse("--intra_op_threads=-2", config=CommonConfig, define=define_common)
