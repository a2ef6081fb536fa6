"""rlhf-pipeline: SFT, reward modelling, PPO and on-policy distillation over one RL core."""

__version__ = "0.1.0"
