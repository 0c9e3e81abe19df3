"""CUDA checks: skipped without a GPU (conftest), run where a device is present."""
import pytest
import torch

from diffusion_irl.sampling.noise import NoiseStream
from diffusion_irl.sampling.samplers import DPMpp2M, Heun

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("sampler", [Heun(), DPMpp2M()])
def test_samplers_on_cuda_match_cpu(sampler, oracle):
    """Same initial state on both devices: the deterministic solvers agree to float32 tolerance."""
    x0 = NoiseStream(0).initial((512, 2)) * 80.0
    cpu = sampler.sample(oracle, (512, 2), 10, NoiseStream(0), x_init=x0).x
    gpu = sampler.sample(oracle, (512, 2), 10, NoiseStream(0, device="cuda"), x_init=x0.cuda()).x
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-4)


def test_pretrain_steps_on_cuda(tmp_path):
    import lightning as L

    from diffusion_irl.data.datamodules import ToyDataModule
    from diffusion_irl.data.toy2d import gmm8
    from diffusion_irl.denoisers.module import DenoiserModule
    from diffusion_irl.denoisers.networks import MLP

    module = DenoiserModule(MLP(2, hidden=64, depth=2), shape=(2,), sigma_data=2.84)
    dm = ToyDataModule(gmm8(), n_train=2048, n_heldout=512, batch_size=256, sigma_data=2.84)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=20, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    D = module.denoiser().cuda()
    assert D(torch.randn(8, 2, device="cuda"), 1.0).device.type == "cuda"
