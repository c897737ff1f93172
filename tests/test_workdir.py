"""workdir.py: the one way tools open a run — config, tokenizer and parameters, restored onto any mesh with no
optimizer."""
import json
import shutil

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from stem_jax import checkpoint, sharding, workdir


def test_restore_onto_another_mesh_gives_the_saved_params(stem_workdir):
    one = workdir.restore(stem_workdir, (1, 1, 1), devices=jax.devices()[:1])
    eight = workdir.restore(stem_workdir, (2, 2, 2))  # saved from one device; tables now over 4 vocab shards
    assert one.step == eight.step == 1 and dict(eight.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert one.cfg.mesh.shape == eight.cfg.mesh.shape == (-1, 1, 1)  # the run's own mesh config is untouched
    table = eight.params["blocks"][1]["ffn"]["table"].get_value()
    assert table.sharding.spec[0] == ("data", "fsdp")
    flat_one = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(one.params))[0])
    for path, a in jax.tree_util.tree_flatten_with_path(jax.device_get(eight.params))[0]:
        np.testing.assert_array_equal(a, flat_one[path], err_msg=jax.tree_util.keystr(path))
    # (a sharded forward equals the unsharded one: test_model.py)


def test_no_optimizer_state_is_read_or_built(stem_workdir):
    run = workdir.restore(stem_workdir, (1, 1, 1), devices=jax.devices()[:1])
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.params)[0]}
    assert names and not any("opt_state" in n or "mu" in n or "nu" in n for n in names)
    assert not hasattr(run, "opt_state")


def test_tokenizer_is_read_lazily_and_checked_against_the_checkpoint(stem_workdir, tmp_path):
    run = workdir.restore(stem_workdir, (1, 1, 1), devices=jax.devices()[:1])
    assert run.tokenizer is None
    tok = run.require_tokenizer()
    assert tok.get_vocab_size() > 0 and run.tokenizer is tok
    workdir.check_tokenizer(stem_workdir, run.step, tok)
    other = Tokenizer.from_str(tok.to_str().replace('"<|endoftext|>"', '"<|eot|>"', 1))
    assert checkpoint.fingerprint(other.to_str()) != checkpoint.fingerprint(tok.to_str())
    with pytest.raises(ValueError, match="does not match checkpoint 1"):
        workdir.check_tokenizer(stem_workdir, run.step, other)


def test_bad_workdirs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        workdir.restore(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        workdir.load_tokenizer(tmp_path)


def test_the_checkpoints_model_wins_over_a_config_json_that_disagrees(stem_workdir, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(stem_workdir, work)
    cfg = json.loads((work / "config.json").read_text())
    d_ff = cfg["model"]["d_ff"]
    cfg["model"]["d_ff"] = 2 * d_ff  # an edited or replaced config.json
    (work / "config.json").write_text(json.dumps(cfg))
    said = []
    run = workdir.restore(work, (1, 1, 1), devices=jax.devices()[:1], log=said.append)
    assert run.cfg.model.d_ff == d_ff and run.params["blocks"][0]["ffn"]["w_down"].get_value().shape[0] == d_ff
    assert said == [f"warning: {work / 'config.json'} does not match checkpoint 1 (model.d_ff: {2 * d_ff} in "
                    f"config.json, {d_ff} in the checkpoint); using the checkpoint's model"]


@pytest.mark.parametrize("devices,batch,shape", [(8, 8, (8, 1, 1)), (3, 16, (2, 1, 1)), (8, 12, (6, 1, 1)),
                                                 (5, 7, (1, 1, 1))])
def test_auto_mesh_uses_the_most_devices_that_divide_the_batch(devices, batch, shape):
    mesh = workdir.tool_mesh("auto", batch, jax.devices()[:devices])
    assert tuple(mesh.shape.values()) == shape


@pytest.mark.parametrize("value", ["a,b", "2,1", "0,1,1", "-1,-1,1", "", "auto,1"])
def test_bad_mesh_flags_are_one_line_errors(value):
    with pytest.raises(sharding.MeshError, match=f"--mesh={value}: expected 'auto' or three sizes data,fsdp,tensor"):
        sharding.parse_mesh(value)
    assert sharding.parse_mesh(" 2, 2 ,-1") == (2, 2, -1) and sharding.parse_mesh("AUTO") == "auto"
