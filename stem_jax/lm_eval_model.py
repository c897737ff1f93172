"""lm-evaluation-harness model ``stem_jax``: a trained workdir scored by ``scoring.Scorer``.

Needs the optional ``lmeval`` extra (``pip install -e ".[lmeval]"``); the rest of stem_jax imports without it.
Importing this module registers the model. The stock ``lm_eval`` CLI cannot import it, so run the CLI
through this module, which registers the model first:

    python -m stem_jax.lm_eval_model run --model stem_jax --model_args workdir=runs/tiny,batch_size=8 \\
        --include_path tasks_dir --tasks tiny_mc

model_args: ``workdir`` (required), ``step`` (default: latest checkpoint), ``batch_size`` (rows per forward;
takes precedence over the CLI's ``--batch_size``, whose default is 1, and ``main`` reports it as lm-eval's
batch size), ``mesh`` (``data:fsdp:tensor``, default ``-1:1:1``; colons because model_args are comma-separated).
"""
from __future__ import annotations

import sys
from typing import Any

try:  # the optional lmeval extra
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import simple_parse_args_string
except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(f"stem_jax.lm_eval_model needs lm-eval ({e}); install it with "
                              "pip install -e '.[lmeval]'") from e

from stem_jax import cli, sharding
from stem_jax.scoring import Scorer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives no max_gen_toks


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "" or str(value).startswith("auto"):
        return None  # "auto" batch sizing has no meaning for a fixed-shape forward
    return int(value)


@register_model("stem_jax")
class StemJaxLM(LM):
    """Delegates every request type to a ``Scorer``. SPMD: every JAX process runs every request, so lm-eval
    sees one rank."""

    def __init__(self, workdir: str | None = None, step: Any = None, batch_size: Any = None, mesh: str = "auto",
                 scorer: Scorer | None = None, **_ignored: Any):  # max_batch_size, device: not used
        super().__init__()
        if scorer is None:
            if not workdir:
                raise ValueError("model_args needs workdir=<a stem-jax training workdir>")
            shape = sharding.parse_mesh(str(mesh).replace("x", ",").replace(":", ","))
            scorer = Scorer.from_workdir(workdir, _int_or_none(step), shape, _int_or_none(batch_size))
        self.scorer = scorer
        self.batch_sizes = {"forward": scorer.eval_batch}  # lm-eval reports these beside its own batch_size

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "StemJaxLM":
        # lm-eval passes the CLI's batch_size (default 1) beside model_args; model_args wins.
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "StemJaxLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (sampling arguments are ignored); requests with the same stop strings and token budget
        are generated together."""
        groups: dict[tuple, list[int]] = {}
        prompts = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            until = kwargs.get("until") or [self.scorer.tokenizer.id_to_token(self.scorer.eot_id)]
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))), []).append(i)
            prompts.append(context)
        out = [""] * len(requests)
        for (until, max_tokens), idx in groups.items():
            for i, text in zip(idx, self.scorer.generate_until([prompts[i] for i in idx], until, max_tokens)):
                out[i] = text
        return out


def _batch_size_from_model_args(argv: list[str]) -> list[str]:
    """``argv`` whose ``--batch_size`` is model_args' ``batch_size`` when that is given (it is the one used), so
    lm-eval's header and results report the batch size of the forward, not the CLI's default of 1."""
    def value_after(flag):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return i, 2, argv[i + 1]
            if a.startswith(flag + "="):
                return i, 1, a.split("=", 1)[1]
        return None
    found = value_after("--model_args")
    size = found and simple_parse_args_string(found[2]).get("batch_size")
    if size is None or not str(size).strip():
        return argv
    old = value_after("--batch_size")
    rest = argv if old is None else argv[:old[0]] + argv[old[0] + old[1]:]
    return rest + ["--batch_size", str(size)]


def main() -> None:
    """The lm_eval CLI with ``stem_jax`` registered."""
    cli.enable_compilation_cache()
    sys.argv = _batch_size_from_model_args(sys.argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
