"""Evaluate a training workdir: restores its latest checkpoint and writes <workdir>/eval.json.

    python eval.py --workdir runs/tiny
"""
from absl import app, flags

from stem_jax import cli

flags.DEFINE_string("workdir", "runs/tiny", "A workdir written by train.py.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_integer("eval_batches", None, "Validation batches (0 = the whole split; default: as trained).")
flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor sizes of the evaluation mesh.")


def main(argv):
    cli.check_no_args(argv)
    cli.enable_compilation_cache()
    from stem_jax import evaluate
    f = flags.FLAGS
    mesh = tuple(int(x) for x in f.mesh)
    cli.run_user_errors(evaluate.evaluate_workdir, f.workdir, mesh, f.step, f.eval_batches)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
