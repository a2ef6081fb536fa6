"""Pure tensor math of the on-policy RL core: no models, no I/O, no config objects.

Shapes: (B, T) over response tokens, logits (B, T, V), per-sequence (B,);
mask True = a response token that counts.
chunked.py computes the same per-token numbers from hidden states (B, T, H) through the output layer in
chunks of positions (no full (B, T, V) logits); its `causal_lm_hidden` is the one helper that calls a model.
"""

from pipeline.rl.advantages import (
    discounted_returns,
    gae,
    reinforce_advantages,
    rloo_advantages,
    rloo_token_advantages,
    spread_over_tokens,
    token_level_rewards,
)
from pipeline.rl.chunked import (
    LMHead,
    causal_lm_hidden,
    chunked_divergence,
    chunked_token_logprobs,
    output_head,
)
from pipeline.rl.kl import (
    AdaptiveKLController,
    FixedKLController,
    forward_kl_full,
    generalized_jsd_full,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_penalty,
    reverse_kl_full,
    student_state_figures,
)
from pipeline.rl.logprobs import entropy_from_logits, logprobs_from_logits
from pipeline.rl.losses import (
    distill_loss,
    divergence_fn,
    entropy_bonus,
    eos_state_weights,
    explained_variance,
    kl_loss,
    policy_loss,
    sampled_rewards,
    value_loss,
)
from pipeline.rl.mixture import mixture_beta, mixture_coins
from pipeline.rl.masks import masked_mean, masked_sum, masked_var, masked_whiten
