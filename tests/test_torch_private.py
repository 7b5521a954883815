"""The two private torch functions lightning-reg uses (lightning_reg/_torch_private.py), checked against public
torch: if a torch release changes or drops either, these tests fail, loudly, rather than draws or memory reuse
changing silently."""

import torch
from scipy import stats

from lightning_reg._torch_private import standard_gamma, storage_use_count


def test_standard_gamma_draws_gamma_from_the_generator_it_is_given():
    assert hasattr(torch, "_standard_gamma"), "torch dropped torch._standard_gamma: replace it in _torch_private.py"
    concentration = torch.full((4000,), 0.3, dtype=torch.float64)
    a = standard_gamma(concentration, torch.Generator().manual_seed(0))
    b = standard_gamma(concentration, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # the generator, not the global RNG, decides
    torch.manual_seed(1)
    assert torch.equal(standard_gamma(concentration, torch.Generator().manual_seed(0)), a)
    # The distribution torch.distributions.Gamma samples (public torch), and scipy's Gamma(0.3, 1).
    public = torch.distributions.Gamma(concentration, torch.ones(4000)).sample()
    assert stats.ks_2samp(a.numpy(), public.numpy()).pvalue > 1e-3
    assert stats.kstest(a.numpy(), stats.gamma(0.3).cdf).pvalue > 1e-3


def test_storage_use_count_counts_every_holder_of_the_memory():
    assert hasattr(torch._C, "_storage_Use_Count"), "torch dropped _storage_Use_Count: replace it in _torch_private.py"
    t = torch.zeros(4, 3)
    assert storage_use_count(t) == 1
    holders = [t[1:], t.detach(), t.numpy()]
    assert storage_use_count(t) == 4  # views, detached aliases and numpy arrays share the storage
    del holders
    assert storage_use_count(t) == 1
    alias = t.view(4, 3)  # what the callbacks hand out: an alias of the tensor they own
    graph = (alias * torch.ones(3, requires_grad=True)).sum()  # autograd saves the alias for backward
    del alias
    assert storage_use_count(t) == 2
    del graph
    assert storage_use_count(t) == 1
