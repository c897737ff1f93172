"""Train a STEM (or dense) transformer.

    python train.py                                    # tiny STEM preset on the embedded corpus
    python train.py --config configs/tiny.py --workdir runs/tiny --config.train.steps=200
"""
from absl import app, flags

from stem_jax import cli

flags.DEFINE_string("workdir", "runs/tiny", "Where config, metrics, TensorBoard files and checkpoints go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (one process per host).")
_CONFIG = cli.define_config_flag()


def main(argv):
    cli.check_no_args(argv)
    if flags.FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    from stem_jax import trainer
    cli.run_user_errors(trainer.train_and_evaluate, cli.checked(_CONFIG), flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
