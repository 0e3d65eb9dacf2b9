"""HessianEigenvalues under 2-process CPU (gloo) DDP: each rank holds half of the sample; the all-reduced operator
gives the single-process eigenvalues on the whole sample."""

import os

import pytest
import torch

from flatlit.curvature import HessianOperator, lanczos
from flatlit.data import MNISTDataModule
from flatlit.methods import SGDFamily
from tests.helpers import run_torchrun


@pytest.mark.distributed
def test_ddp_eigenvalues_equal_single_process(tmp_path, mnist_dir):
    out = str(tmp_path / "eig")
    run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_eigen_worker.py"), [mnist_dir, out], port=29544)
    res = [torch.load(f"{out}.{r}") for r in range(2)]
    assert [r["shard"] for r in res] == [45, 45]
    torch.manual_seed(0)
    module = SGDFamily(arch="mlp", arch_kwargs={"width": 6, "batch_norm": True}).double()
    dm = MNISTDataModule(data_dir=mnist_dir, batch_size=30, download=False)
    dm.setup("fit")
    batches = [(x.double(), y) for x, y in dm.curvature_batches(90, 20, seed=0)]
    op = HessianOperator(module, batches, distributed=False)
    ref = lanczos(op.matvec, op.numel, 3, 300, 1e-10, 0, "LA", torch.float64)
    for r in range(2):
        torch.testing.assert_close(
            torch.tensor(res[r]["eigenvalues"], dtype=torch.float64), ref.eigenvalues, rtol=1e-6, atol=0
        )
    # batched HVPs: the 2-process all-reduced H V equals one process's on the whole sample
    module.load_state_dict(res[0]["state"])
    op = HessianOperator(module, batches, distributed=False)
    expected = op.matmat(res[0]["V"])
    torch.testing.assert_close(res[0]["matmat"], res[1]["matmat"], rtol=0, atol=0)
    for r in range(2):
        torch.testing.assert_close(res[r]["matmat"], expected, rtol=1e-9, atol=1e-12)
    # after a step (BN statistics differ between ranks) the block solver on both ranks measures rank 0's network
    ref = lanczos(op.matvec, op.numel, 3, 300, 1e-10, 0, "LA", torch.float64)
    for r in range(2):
        torch.testing.assert_close(
            torch.tensor(res[r]["after_step"], dtype=torch.float64), ref.eigenvalues[:2], rtol=1e-6, atol=0
        )


@pytest.mark.distributed
def test_ddp_plain_project_unperturbed_and_exact(tmp_path):
    from tests.callbacks.projects import Net
    from tests.callbacks.test_any_project import exact_top

    out = str(tmp_path / "proj")
    run_torchrun(os.path.join(os.path.dirname(__file__), "ddp_project_worker.py"), [out], port=29545)
    res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for r in res:
        for key, value in r["plain"]["state"].items():
            assert torch.equal(value, r["observed"]["state"][key]), key
        assert all(torch.equal(a, b) for a, b in zip(r["plain"]["momentum"], r["observed"]["momentum"]))
        assert r["plain"]["flags"] == r["observed"]["flags"] and torch.equal(r["plain"]["rng"], r["observed"]["rng"])
    torch.testing.assert_close(res[0]["eigenvalues"], res[1]["eigenvalues"], rtol=0, atol=0)
    # the exact Hessian of the module's loss on the union of the two ranks' halves of the sample
    module = Net(frozen_bn=True)
    module.load_state_dict(res[0]["observed"]["state"])
    batches = res[0]["batches"] + res[1]["batches"]
    assert sum(len(y) for _, y in batches) == 40
    expected = exact_top(module, batches, lambda fwd, b: torch.nn.functional.cross_entropy(fwd(b[0]), b[1]))
    torch.testing.assert_close(res[0]["eigenvalues"], expected, rtol=1e-7, atol=1e-10)
