#!/usr/bin/env bash
# The GAE ablation of docs/results.md (issue 18): PPO with a critic against the quickstart's RLOO, on the
# quickstart's SFT model and reward model, one variant at a time (2 cores: never two at once).
#   QS=runs/quickstart OUT=runs/ablate bash scripts/ablate_gae.sh gae_today gae_sep gae_sep_warm ...
# then: python scripts/compare_runs.py $QS/eval:ppo $OUT/gae_today/eval:ppo ...
set -u
cd "$(dirname "$0")/.."
QS=${QS:-runs/quickstart}
OUT=${OUT:-runs/ablate}
COMMON="run.inputs_from=$QS eval.models=[ppo] eval.reference=sft ppo.advantage=gae ppo.samples_per_prompt=1 ppo.rollout_batch_size=16 ppo.critic_from=reward"
run() {
  name=$1; shift
  echo "=== $name $(date +%T)"
  /usr/bin/time -f "$name wall %e s maxrss %M KB" python3 -m pipeline run recipes/ppo.yaml run.output_dir=$OUT/$name \
    $COMMON "$@" > $OUT/$name.log 2>&1
  tail -3 $OUT/$name.log
}
mkdir -p $OUT
for v in "$@"; do
  case $v in  # each row at most RLOO's PPO time: 11 iterations, or 3 critic-only + 9
    gae_today) run gae_today ppo.critic_optimizer=shared ppo.critic_lr=1e-4 ppo.iterations=11 ;;
    gae_sep) run gae_sep ppo.critic_optimizer=separate ppo.critic_lr=1e-4 ppo.iterations=11 ;;
    gae_sep_warm) run gae_sep_warm ppo.critic_lr=1e-4 ppo.critic_warmup=3 ppo.iterations=9 ;;
    gae_warm_clr) run gae_warm_clr ppo.critic_warmup=3 ppo.iterations=9 ppo.critic_lr=1e-3 ;;
    gae_warm_clr_l1) run gae_warm_clr_l1 ppo.critic_warmup=3 ppo.iterations=9 ppo.critic_lr=1e-3 ppo.gae_lambda=1.0 ;;
    gae_warm_clr_pol) run gae_warm_clr_pol ppo.critic_warmup=3 ppo.iterations=9 ppo.critic_lr=1e-3 ppo.critic_from=policy ;;
    gae_best_long) run gae_best_long ppo.critic_warmup=3 ppo.iterations=24 ppo.critic_lr=1e-3 ppo.critic_from=policy ;;
    gae_best_rscale) run gae_best_rscale ppo.critic_warmup=3 ppo.iterations=9 ppo.critic_lr=1e-3 ppo.critic_from=policy \
      "ppo.rewards=[{kind: rm, source: reward, weight: 0.5}, {kind: verifier, weight: 0.5, partial: true}]" ;;
    *) echo "unknown variant $v (gae_today gae_sep gae_sep_warm gae_warm_clr gae_warm_clr_l1 gae_warm_clr_pol gae_best_long gae_best_rscale)" ;;
  esac
done
