import pytest

from signclip_jax.errors import UserError
from signclip_jax.train import distributed


@pytest.mark.parametrize(
    "env, kind",
    [
        ({}, None),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"}, None),
        ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
        ({"SIGNCLIP_DISTRIBUTED": "1"}, "auto"),
        ({"SIGNCLIP_COORDINATOR": "127.0.0.1:1234", "SLURM_NTASKS": "4"}, "explicit"),
    ],
)
def test_cluster_kind(env, kind):
    assert distributed.cluster_kind(env) == kind


def test_single_process_does_not_initialize():
    assert distributed.initialize(env={}) is False


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SIGNCLIP_COORDINATOR": "127.0.0.1:1"}, "number of processes"),
        (
            {
                "SIGNCLIP_COORDINATOR": "127.0.0.1:1",
                "SIGNCLIP_NUM_PROCESSES": "2",
                "SIGNCLIP_PROCESS_ID": "2",
            },
            "not in",
        ),
        (
            {
                "SIGNCLIP_COORDINATOR": "127.0.0.1:1",
                "SIGNCLIP_NUM_PROCESSES": "two",
                "SIGNCLIP_PROCESS_ID": "0",
            },
            "integer",
        ),
    ],
)
def test_bad_explicit_settings_are_clear_errors(env, message):
    with pytest.raises(UserError, match=message):
        distributed.initialize(env=env)
