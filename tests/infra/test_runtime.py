import sys

import pytest

from infra.runtime import launch_command


def test_torchrun_command_drops_launcher_flags():
    argv = ["-v", "train", "--config", "c.yaml", "--launcher", "torchrun", "--nproc=4", "--max-steps", "3"]
    command = launch_command("torchrun", 4, argv)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4"]
    assert command[-7:] == ["infra.cli", "-v", "train", "--config", "c.yaml", "--max-steps", "3"]


def test_deepspeed_command_takes_a_hostfile():
    command = launch_command("deepspeed", 8, ["train", "--launcher", "deepspeed", "--hostfile", "hosts"], hostfile="hosts")
    assert command[0].endswith("deepspeed") and command[1:5] == ["--hostfile", "hosts", "--num_gpus", "8"]
    assert command[-4:] == ["--no_local_rank", "--module", "infra.cli", "train"]


def test_hostfile_needs_deepspeed():
    with pytest.raises(ValueError, match="deepspeed"):
        launch_command("torchrun", 2, ["train"], hostfile="hosts")
