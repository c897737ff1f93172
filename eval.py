"""Evaluate a training workdir: restores its latest checkpoint and writes <workdir>/eval.json and eval.md.

    python eval.py --workdir runs/tiny
    python eval.py --workdir runs/tiny --mc_jsonl tests/data/tiny_mc.jsonl --niah=default
    python eval.py --workdir runs/tiny --tfds_tasks ai2_arc/ARC-Easy,piqa --tfds_data_dir ~/tfds --limit 200
"""
from absl import app, flags

from stem_jax import cli, evaluate, sharding, workdir

flags.DEFINE_string("workdir", "runs/tiny", "A workdir written by train.py.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_integer("eval_batches", None, "Validation batches (0 = the whole split; default: as trained).")
flags.DEFINE_string("mesh", "auto", "data,fsdp,tensor sizes of the evaluation mesh, or auto: the most devices "
                    "whose count divides the batch.")
flags.DEFINE_string("text_file", None, "Report val_loss/val_ppl on this UTF-8 text file instead of the "
                    "held-out split.")
flags.DEFINE_list("mc_jsonl", [], "Multiple-choice JSONL files (question, choices, label per line); the task "
                  "name is the file stem.")
flags.DEFINE_string("mc_template", "qa", "Prompt of the --mc_jsonl questions: qa ('Question: {question}\\n"
                    "Answer:'), cloze ('{question}') or any string holding {question}; a line's 'template' key "
                    "overrides it.")
flags.DEFINE_string("mc_target_delimiter", " ", "Put before every choice, as lm-eval's target_delimiter; use '' when "
                    "the choices start with a space. A line's 'target_delimiter' key overrides it.")
flags.DEFINE_list("tfds_tasks", [], "TFDS multiple-choice tasks: ai2_arc/ARC-Easy, ai2_arc/ARC-Challenge, "
                  "openbookqa, piqa, hellaswag, bool_q, winogrande (prepared under --tfds_data_dir).")
flags.DEFINE_string("tfds_data_dir", None, "data_dir holding the prepared TFDS tasks (default: TFDS's own).")
flags.DEFINE_string("niah", None, "Needle in a haystack: comma-separated context lengths in tokens, or "
                    "'default' for seq_len/4, seq_len/2, seq_len.")
flags.DEFINE_list("niah_depths", ["0", "0.5", "1"], "Needle depths in [0, 1] (0 = start of the haystack).")
flags.DEFINE_integer("limit", None, "At most this many examples per task (NIAH: per length and depth; "
                     "default 4).")
flags.DEFINE_integer("eval_batch", None, "Rows per scoring forward (default 8, rounded up to the mesh's "
                     "batch shards).")


def _niah_lengths(value: str | None, seq_len_of) -> list[int]:
    if not value or value.lower() in ("0", "false", "no", "none"):
        return []
    if value.lower() in ("default", "1", "true", "yes"):
        return evaluate.default_niah_lengths(seq_len_of())
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        cli.die(f"--niah={value!r}: expected comma-separated token counts like 32,64,128, or 'default'")


def main(argv):
    cli.check_no_args(argv)
    f = flags.FLAGS
    seq_len = lambda: cli.run_user_errors(workdir.load_run_config, f.workdir).model.seq_len
    try:
        depths = [float(d) for d in f.niah_depths]
    except ValueError:
        cli.die(f"--niah_depths={','.join(f.niah_depths)}: expected numbers in [0, 1]")
    options = evaluate.EvalOptions(
        text_file=f.text_file, mc_jsonl=f.mc_jsonl, mc_template=f.mc_template,
        mc_target_delimiter=f.mc_target_delimiter, tfds_tasks=f.tfds_tasks, tfds_data_dir=f.tfds_data_dir,
        niah_lengths=_niah_lengths(f.niah, seq_len), niah_depths=depths, limit=f.limit, eval_batch=f.eval_batch)
    mesh = cli.run_user_errors(sharding.parse_mesh, f.mesh)  # before any work
    cli.run_user_errors(evaluate.evaluate_workdir, f.workdir, mesh, f.step, f.eval_batches, options)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
