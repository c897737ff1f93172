"""The search of benchmarks/tpu_fit.py with a fake compiler (nothing is compiled): it walks the policies from
the least recompute up, jumps microbatches by the compiler's reported shortfall, and stops at the first fit
with enough headroom."""
from benchmarks import tpu_fit

GiB = 2 ** 30
OOM = "Ran out of memory on HBM, the total memory required for HLO temporaries ({}G) exceeds available HBM (95.74G)."


def fake_compiler(fits):
    """A ``tpu_fit.run`` whose step needs ``fits(remat, k)`` GiB in total on a 95 GiB device."""
    calls = []

    def run(preset, topology, remat, k, timeout):
        calls.append((remat, k))
        need = fits(remat, k)
        if need > 95:
            return {"status": "OOM", "error": OOM.format(need), "remat": remat, "microbatches": k}
        return {"status": "fits", "remat": remat, "microbatches": k,
                "memory_per_device": {"total": need * GiB}, "hbm_per_device": 95 * GiB}
    return run, calls


def test_the_shortfall_sets_the_next_microbatch_count():
    assert tpu_fit.next_microbatches({"error": OOM.format(760.0)}, 1) == 16  # 760 / (0.8 x 95.74) = 9.9
    assert tpu_fit.next_microbatches({"error": OOM.format(80.0)}, 4) == 8   # at least double
    assert tpu_fit.next_microbatches({"error": "something else"}, 2) == 4


def test_search_stops_at_the_first_fit_with_headroom(monkeypatch):
    # "none" needs 900 GiB / k, "dots" 300 / k; 16 sequences per device on v5p:4x4x2 (32 chips).
    run, calls = fake_compiler(lambda remat, k: {"none": 900, "dots": 300, "full": 100}[remat] / k)
    monkeypatch.setattr(tpu_fit, "run", run)
    tries = tpu_fit.search("stem_350m", "v5p:4x4x2", 512, 0.15, 60, lambda r: None)
    # none: 900 -> k=16 (56 GiB, fits); 16 is the per-device batch, so no policy beyond it is tried.
    assert calls == [("none", 1), ("none", 16)]
    assert tries[-1]["status"] == "fits"


def test_search_moves_to_more_recompute_when_the_batch_runs_out(monkeypatch):
    run, calls = fake_compiler(lambda remat, k: {"none": 9000, "dots": 3000, "full": 200}[remat] / k)
    monkeypatch.setattr(tpu_fit, "run", run)
    tpu_fit.search("stem_350m", "v5p:4x4x2", 512, 0.15, 60, lambda r: None)
    # none at k=1 asks for k=128 > 16: next policy. dots likewise (k=64). full: 200 -> k=4 (50 GiB).
    assert calls == [("none", 1), ("dots", 1), ("full", 1), ("full", 4)]


def test_a_fit_without_headroom_doubles_the_microbatches(monkeypatch):
    run, calls = fake_compiler(lambda remat, k: 90 if k == 1 else 50)
    monkeypatch.setattr(tpu_fit, "run", run)
    tpu_fit.search("stem_350m", "v5p:4x4x2", 512, 0.15, 60, lambda r: None)
    assert calls == [("none", 1), ("none", 2)]


def program(total_gib, **extra):
    mem = {"argument": GiB, "output": 0, "temp": total_gib * GiB - GiB, "alias": 0, "total": total_gib * GiB}
    return {"status": "compiled", "memory_per_device": mem, "cost_per_device": {"flops": 2e12, "bytes": 1.0},
            "largest_collective": {"kind": "all-gather", "bytes": 64 * 2**20}, "all_to_all": 3, "compile_s": 5.0,
            **extra}


def test_the_other_programs_compile_at_the_winning_setting_and_render_with_their_commit(monkeypatch):
    seen = []

    def run(preset, topology, remat, k, timeout, programs="train"):
        seen.append((remat, k, programs))
        return {"status": "OOM", "error": "eval: RESOURCE_EXHAUSTED", "commit": "c" * 40 + "+local",
                "programs": {"init": program(20, peak_over_state=1.1, state_per_device=18 * GiB),
                             "eval": {"status": "OOM", "error": "RESOURCE_EXHAUSTED: eval"},
                             "prefill": program(90), "decode": program(30)}}
    monkeypatch.setattr(tpu_fit, "run", run)
    winner = {"preset": "stem_1b", "topo": "v5p:4x4x2", "remat": "dots", "microbatches": 2, "status": "fits",
              "hbm_per_device": 100 * GiB, "commit": "a" * 40, "programs": {"train": program(50)}}
    winner["other"] = tpu_fit.other_programs(winner, 60)
    assert seen == [("dots", 2, "init,eval,prefill,decode")]
    rows = tpu_fit.program_rows(winner, 0.15)
    assert [r.split(" | ")[3] for r in rows] == ["init", "train", "eval", "prefill", "decode"]
    init, train, ev, prefill, decode = rows
    assert "**yes**" in init and "20.00 (80% free; 1.10 x state)" in init and init.endswith(f"| {'c' * 12}+local |")
    assert "**yes**" in train and train.endswith(f"| {'a' * 12} |")  # the search's own commit
    assert "no: OOM" in ev and "RESOURCE_EXHAUSTED: eval" in ev
    assert "no: < headroom" in prefill  # 10 % free against 15 %
    assert "all-gather 64 MiB | 3 |" in decode
