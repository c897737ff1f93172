"""Train a STEM (or dense) transformer.

    python train.py                                    # tiny STEM preset on the embedded corpus
    python train.py --config configs/tiny.py --workdir runs/tiny --config.train.steps=200

Rerunning the same command resumes from the newest checkpoint in --workdir. SIGTERM / Ctrl-C save a
checkpoint at the current step and exit 0. Multi-process: add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID).
"""
from absl import app, flags

from stem_jax import cli, trainer

flags.DEFINE_string("workdir", "runs/tiny", "Where config, metrics, TensorBoard files and checkpoints go.")
cli.define_distributed_flags()
_CONFIG = cli.define_config_flag()


def main(argv):
    cli.check_no_args(argv)
    cli.init_distributed()
    cli.run_user_errors(trainer.train_and_evaluate, cli.checked(_CONFIG), flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
