"""One module per DVC stage (`python -m mixtune.stages.<name>`): its arguments, the config sections it reads,
its work and its outputs. A stage imports only what it runs, so an edit reruns only the stages that run it."""
