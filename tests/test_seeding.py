"""Seeds from named parts (``diffusion_irl.seeding``) and per-sample noise streams that do not depend on the batch."""
import pytest
import torch

from diffusion_irl.sampling.noise import NoiseStream, counter_normal
from diffusion_irl.seeding import derive_seed, generator, sample_seeds


def test_derive_seed_is_deterministic_and_in_range():
    for parts in [(0,), ("evaluate", 0), ("rollout", 3, 17, 1), ("heldout", 2**40)]:
        s = derive_seed(*parts)
        assert s == derive_seed(*parts)
        assert isinstance(s, int) and 0 <= s < 2**62


def test_distinct_purposes_and_seeds_give_distinct_seeds():
    purposes = ["evaluate", "heldout", "reference", "metrics", "policy", "rollout"]
    seeds = {derive_seed(p, s) for p in purposes for s in range(50)}
    assert len(seeds) == len(purposes) * 50
    # a name never coincides with a small integer, and nesting is not flattening
    assert derive_seed("evaluate") not in {derive_seed(i) for i in range(1000)}
    assert derive_seed("evaluate", 0) != derive_seed("evaluate")


def test_parts_order_matters():
    assert derive_seed("evaluate", 1) != derive_seed(1, "evaluate")
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(0, 0) != derive_seed(0)


@pytest.mark.parametrize("bad", [1.5, None, True, [1], 2.5])
def test_bad_parts_are_type_errors(bad):
    with pytest.raises(TypeError):
        derive_seed("evaluate", bad)


def test_no_parts_is_an_error():
    with pytest.raises(ValueError):
        derive_seed()


def test_numpy_ints_are_accepted():
    np = pytest.importorskip("numpy")
    assert derive_seed("x", np.int64(3)) == derive_seed("x", 3)


def test_sample_seeds_shape_dtype_consecutive():
    s = sample_seeds(50, "evaluate", 0)
    assert s.shape == (50,) and s.dtype == torch.int64 and s.device.type == "cpu"
    assert int(s[0]) == derive_seed("evaluate", 0)
    assert torch.equal(s, int(s[0]) + torch.arange(50))
    assert torch.equal(sample_seeds(7, "evaluate", 0), s[:7])  # a prefix does not depend on n
    assert sample_seeds(0, "evaluate", 0).shape == (0,)
    assert not torch.equal(sample_seeds(50, "evaluate", 1), s)


def test_generator_is_seeded_by_derive_seed():
    g = generator("reference", 3)
    assert g.initial_seed() == derive_seed("reference", 3)
    a = torch.randn(5, generator=generator("reference", 3))
    assert torch.equal(a, torch.randn(5, generator=generator("reference", 3)))
    assert not torch.equal(a, torch.randn(5, generator=generator("reference", 4)))


# --- NoiseStream with per-sample seeds --------------------------------------------------------------------------------

def test_per_sample_noise_does_not_depend_on_the_chunking():
    seeds = sample_seeds(20, "evaluate", 0)
    whole = NoiseStream(seeds=seeds)
    parts = [NoiseStream(seeds=seeds[a:b]) for a, b in [(0, 7), (7, 14), (14, 20)]]
    like = torch.empty(20, 3, 4)
    assert torch.equal(whole.initial((20, 3, 4)), torch.cat([p.initial((len(p.seeds), 3, 4)) for p in parts]))
    for i in (0, 5):
        assert torch.equal(whole.step(i, like), torch.cat([p.step(i, like[: len(p.seeds)]) for p in parts]))
        assert torch.equal(whole.extra(i, like), torch.cat([p.extra(i, like[: len(p.seeds)]) for p in parts]))
    # rows are counter_normal's rows, and different keys are different draws
    torch.testing.assert_close(whole.initial((20, 12)), counter_normal(seeds, 0, 12), rtol=0, atol=0)
    assert not torch.equal(whole.step(0, like), whole.step(1, like))
    assert not torch.equal(whole.step(0, like), whole.extra(0, like))


def test_per_sample_noise_api():
    seeds = sample_seeds(4, "evaluate", 0)
    noise = NoiseStream(seeds=seeds)
    assert noise.seed == int(seeds[0]) and noise.device.type == "cpu" and noise.dtype == torch.float32
    assert NoiseStream(5, seeds=seeds).seed == 5
    x = noise.step(0, torch.empty(4, 2, dtype=torch.float64))
    assert x.dtype == torch.float64
    with pytest.raises(ValueError, match="per-sample seeds"):
        noise.initial((5, 2))
    with pytest.raises(ValueError):
        NoiseStream()
    # many draws are standard normal
    z = NoiseStream(seeds=sample_seeds(4000, "t", 0)).initial((4000, 8))
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
