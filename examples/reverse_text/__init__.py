"""A real (tiny) async-RL run: a decoder-only transformer learns to reverse strings.

Three programs, the seed's shape:

* ``torchrun -m examples.reverse_text.trainer``: FSDP2-sharded trainer, policy-gradient steps,
  DCP checkpoints (``--ckpt.*``) and inference weights ``weights/step_N`` every step;
* ``python -m examples.reverse_text.orchestrator``: samples rollouts with weights that lag the
  trainer by at most ``async_level`` steps, scores them, writes ``rollouts/step_N.pt``;
* ``python -m examples.reverse_text.rl``: launches both with one command line.
"""
