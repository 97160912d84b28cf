"""Training: what every training job runs.

`loop` is the loop (`python -m mmi_jax.train`, `__main__`); `train_state` the state and its
shardings, `optimizer` the release's optimizer, `train_step` the jitted step, `batches` the
step's global batch, `checkpoints` Orbax saves and restores, `config_check` the refusal of
unknown settings, `rng_streams` the named random streams, `metrics_log` and `preemption` the
log and SIGTERM, `background` the compiling thread. What a job adds (the demo's stand-in fits
and evaluation, `mmi_jax.demo`) hooks in through `extensions`.
"""
