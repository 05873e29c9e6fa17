"""The suite proves its power: every plausible bug in backprop/testing/mutants/ must be caught by
the same oracle, drop-in stages, gradcheck and hypothesis strategies that the kernel tests use,
and by the check meant for it."""

import pytest

import backprop
from backprop.testing import suite
from backprop.testing.mutants import MUTANTS, dropin, first_catch

# the drop-in mutants: each is right where the older stages look, so only its own stage can catch it
STAGE = {m.__name__: "jvp" for m in dropin.MUTANTS if m.__name__.endswith("_jvp")}
STAGE.update(linear_fake_2d="opcheck", tanh_skips_zero_dout_backward="vmap",
             tanh_detached_output_backward="second-order")


@pytest.mark.parametrize("m", MUTANTS, ids=[m.__name__ for m in MUTANTS])
def test_mutant_is_caught(m):
    stage = first_catch(m, max_examples=300)
    assert stage is not None, f"mutant survived: {m.__doc__}"
    print(f"{m.__name__}: caught by {stage}")
    # the rest are caught by their gradients, except: two whose bug shows in the forward's output
    # (an overflowing exp; a reduced loss that counts rows twice, linear_cross_entropy's chunks);
    # linear_cross_entropy's missing dbias is a None where a gradient is owed (the contract); its
    # ignored dout is first met on a bfloat16 'mean' case, where a 0.91 dout is inside bfloat16's
    # rounding, and finite differences of that same case (float64) catch it before a float64 draw does;
    # its cache consumed on every backward: right gradients once, the cache modified (the contract)
    other = {"ce_unshifted": "forward", "lce_chunk_boundary_off_by_one": "forward",
             "lce_drops_dbias_backward": "contract", "lce_drops_dout_backward": "gradcheck",
             "lce_consumes_its_cache_backward": "contract"}
    want = STAGE.get(m.__name__, other.get(m.__name__, "gradient"))
    assert stage == want, f"{m.__name__} caught by {stage}, expected {want}: {m.__doc__}"


def test_every_drop_in_stage_has_a_mutant():
    assert set(STAGE.values()) == {"jvp", "opcheck", "vmap", "second-order"}
    assert len([s for s in STAGE.values() if s == "jvp"]) == len(backprop.OPS)  # one wrong jvp per op



def test_the_search_does_not_depend_on_what_the_process_imported(monkeypatch):
    """first_catch's derandomised cases are the same whatever constants Hypothesis found in the
    modules imported so far (it draws some of them: under pytest the conftest, plugins and
    backprop.makemore came in, and a mutant took 87 cases where a bare process took 12). Here the
    process is made to look as if it had imported a module of constants more."""
    providers = pytest.importorskip("hypothesis.internal.conjecture.providers")
    if not hasattr(providers, "_get_local_constants"):
        pytest.skip("another Hypothesis: no constants drawn from the imported modules")
    drawn = []

    def record(name, op, case, checks=()):  # the cases, not the checks: nothing is caught
        args, options = case
        drawn[-1].append(repr((args, sorted(options.items()))))

    def search():
        drawn.append([])
        assert first_catch(dropin.linear_cross_entropy_drops_bias_tangent_jvp, max_examples=30) is None
        return drawn[-1]

    monkeypatch.setattr(suite, "check_case", record)
    monkeypatch.setattr(suite, "gradcheck_case", lambda *a: True)
    before = search()
    pool = providers._get_local_constants()
    more = providers.Constants(integers={3, 5, 7, 11, 384, 600, 1000, 4096, 987654321},
                               floats={0.3, 0.77, 1e-3, 2.5})
    monkeypatch.setattr(providers, "_get_local_constants", lambda: pool | more)
    providers.CONSTANTS_CACHE.cache.clear()
    try:
        assert len(before) == 30 and search() == before
    finally:
        providers.CONSTANTS_CACHE.cache.clear()
