"""orbax checkpoints restore onto other meshes with the new shardings."""
import jax
import numpy as np

from conftest import mesh_of, tiny_config
from stem_jax import checkpoint
from stem_jax.trainer import Setup


def test_save_on_2x4_restore_on_other_meshes(tmp_path):
    cfg = tiny_config()
    src = Setup(cfg, mesh_of((2, 4, 1)))
    state = src.init_state()
    mngr = checkpoint.manager(tmp_path)
    assert checkpoint.save(mngr, state) == 0
    mngr.wait_until_finished()
    mngr.close()
    want = jax.device_get(state["params"])
    for shape in [(1, 1, 1), (4, 2, 1), (2, 2, 2)]:
        dst = Setup(cfg, mesh_of(shape))
        params, step = checkpoint.restore_params(tmp_path, dst.abstract_state["params"],
                                                 dst.state_shardings["params"])
        assert step == 0
        table = params["blocks"][1]["ffn"]["table"].get_value()
        assert table.sharding.is_equivalent_to(dst.state_shardings["params"]["blocks"][1]["ffn"]["table"]
                                               .get_value(), 2)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_config()
    s = Setup(cfg, mesh_of((1, 1, 1)))
    try:
        checkpoint.restore_params(tmp_path / "empty", s.abstract_state["params"], s.state_shardings["params"])
    except FileNotFoundError as e:
        assert "no checkpoint under" in str(e)
    else:
        raise AssertionError("expected FileNotFoundError")
