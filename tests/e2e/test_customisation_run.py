"""Custom dataset, packer and reward functions reach a real run, by config path and by object."""

from __future__ import annotations

import pytest

import rlflow

pytestmark = pytest.mark.ray

DATASET = '''
import pyarrow.parquet as pq

class RawRows:
    """Yields raw parquet rows; the packer tokenises them."""
    def __init__(self, data_files, config):
        self.rows = []
        for path in data_files:
            self.rows += pq.read_table(path).to_pylist()
        self.setup_called = False

    def setup(self, config, tokenizer):
        self.setup_called = True

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]
'''

REWARD = '''
def always_half(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 0.5, "length": len(solution_str)}
'''


def run_steps(tmp_path, overrides, **objects):
    cfg = rlflow.compose_config("grpo", [f"trainer.output_dir={tmp_path / 'out'}", "trainer.total_steps=2",
                                         "trainer.progress_bar=false", *overrides])
    trainer = rlflow.build_trainer(cfg, **objects)
    try:
        return trainer, trainer.fit()
    finally:
        trainer.close()


def test_custom_dataset_packer_and_weighted_rewards_by_path(ray_cluster, tmp_path):
    (tmp_path / "my_data.py").write_text(DATASET)
    (tmp_path / "my_reward.py").write_text(REWARD)
    packer_file = tmp_path / "my_packer.py"
    packer_file.write_text("from rlflow.data.packer import ChatDataPacker\n\nclass Packer(ChatDataPacker):\n    pass\n")
    trainer, history = run_steps(tmp_path, [
        f"data.custom_cls.path={tmp_path / 'my_data.py'}", "data.custom_cls.name=RawRows",
        f"data.packer.path={packer_file}", "data.packer.name=Packer",
        f"reward.fns=[{{path:{tmp_path / 'my_reward.py'},name:always_half,weight:2.0}},{{path:null,name:null,weight:1.0,label:rule}}]",
    ])
    assert trainer.train_dataset.setup_called
    for row in history:
        # 2 x 0.5 from the custom function plus the rule reward (0 or 1) on each answer
        assert row["reward/always_half"] == 0.5
        assert row["reward/mean"] == pytest.approx(1.0 + row["reward/rule"])
        assert row["reward/always_half/length"] >= 0


def test_reward_function_passed_as_python_object(ray_cluster, tmp_path):
    def constant(data_source, solution_str, ground_truth, extra_info=None):
        return 0.25

    _, history = run_steps(tmp_path, [], reward_fn=constant)
    assert [row["reward/mean"] for row in history] == [0.25, 0.25]
