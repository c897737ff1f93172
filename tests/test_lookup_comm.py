"""The HLO collective parser of benchmarks/lookup_comm.py on a hand-written module (nothing is compiled)."""
import pytest

from benchmarks import lookup_comm

HLO = """HloModule jit_f, entry_computation_layout={(f32[2,64]{1,0})->f32[16,64]{1,0}}, num_partitions=8

ENTRY %main.1_spmd (param: f32[2,64], param.1: s32[4]) -> (f32[16,64], f32[8], s32[4]) {
  %param = f32[2,64]{1,0} parameter(0), sharding={devices=[8,1]<=[8]}
  %ag-start = (f32[2,64]{1,0}, f32[16,64]{1,0}) all-gather-start(%param), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, use_global_device_ids=true
  %ag-done = f32[16,64]{1,0} all-gather-done(%ag-start)
  %ar = bf16[8,32]{1,0} all-reduce(%x), channel_id=2, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ar.1 = (f32[8]{0}, s32[4]{0}) all-reduce(%a, %b), channel_id=3, replica_groups=mesh['data'=2,'fsdp'=4] {'data'}, to_apply=%add
  %rs = f32[4,64]{1,0} reduce-scatter(%y), channel_id=4, replica_groups={}, dimensions={0}, to_apply=%add
  %cp = s32[4]{0} collective-permute(%param.1), channel_id=5, source_target_pairs={{0,0},{1,2},{2,1},{3,3}}
  %fusion = f32[16,64]{1,0} fusion(%ag-done, %all-reduce), kind=kLoop, calls=%fused_computation
  ROOT %tuple = (f32[16,64]{1,0}, f32[8]{0}, s32[4]{0}) tuple(%fusion, %ar.1, %cp)
}
"""


def test_collective_bytes_per_kind():
    assert lookup_comm.collective_bytes(HLO) == {
        "all-gather": 16 * 64 * 4,  # the gathered output, counted once for the -start/-done pair
        "all-reduce": 8 * 32 * 2 + (8 * 4 + 4 * 4),  # bf16 buffer + the (f32[8], s32[4]) tuple
        "reduce-scatter": 4 * 64 * 4,  # the scattered shard
        "all-to-all": 0,
        "collective-permute": 4 * 4,
    }


def test_groups_and_wire_bytes():
    ops = {(c.kind, c.result_bytes): c for c in lookup_comm.collectives(HLO)}
    assert len(ops) == 5
    expected = {  # (kind, result bytes): (group size, wire bytes per device)
        ("all-gather", 4096): (8, 4096 * 7 / 8),  # explicit groups
        ("all-reduce", 512): (4, 512 * 2 * 3 / 4),  # iota [2,4]<=[8]: groups of 4
        ("all-reduce", 48): (2, 48 * 2 * 1 / 2),  # mesh axis 'data' of size 2
        ("reduce-scatter", 1024): (8, 1024 * 7),  # replica_groups={}: all num_partitions=8 devices
        ("collective-permute", 16): (4, 16 * 2 / 4),  # 2 of 4 pairs send to another device
    }
    for key, (group, wire) in expected.items():
        assert (ops[key].group, ops[key].wire_bytes) == (group, pytest.approx(wire)), key
    assert [k for k, c in ops.items() if c.integer] == [("collective-permute", 16)]
