"""Shared fixtures: small models with known structure, and golden-file comparison."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(autouse=True)
def no_host_cost_table(monkeypatch, tmp_path_factory):
    """Kernels in tests take their heuristic schedules, whatever cost table the machine running
    the tests has measured (tests of the table point this at their own file)."""
    monkeypatch.setenv("SPARSECC_COST_TABLE", str(tmp_path_factory.getbasetemp() / "no-cost-table.json"))


class TinyMLP(torch.nn.Module):
    """Two linears on a 3-D input (batch, tokens, features) plus a classifier the 16x1 blocks
    cannot tile (10 outputs) and with too few inputs (32) to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyConvNet(torch.nn.Module):
    """A 3x3 conv (stays dense), a pointwise conv (packable) and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 64, 3, padding=1)
        self.pointwise = torch.nn.Conv2d(64, 32, 1)
        self.fc = torch.nn.Linear(32 * 4 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pointwise(torch.relu(self.conv(x))))
        return self.fc(h.flatten(1))


def seeded(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module.eval()


@pytest.fixture
def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    model = seeded(TinyMLP())
    gen = torch.Generator().manual_seed(1)
    example = (torch.randn(2, 3, 64, generator=gen),)
    calib = [(torch.randn(2, 3, 64, generator=gen),) for _ in range(4)]
    return model, example, calib


@pytest.fixture
def convnet() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    model = seeded(TinyConvNet())
    gen = torch.Generator().manual_seed(2)
    example = (torch.randn(2, 3, 4, 4, generator=gen),)
    calib = [(torch.randn(2, 3, 4, 4, generator=gen),) for _ in range(4)]
    return model, example, calib


@pytest.fixture
def x86():
    from sparsecc.targets import get_target

    return get_target("x86")


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/<name>; SPARSECC_UPDATE_GOLDEN=1 rewrites the file."""
    path = GOLDEN_DIR / name
    if os.environ.get("SPARSECC_UPDATE_GOLDEN") == "1" or not path.exists():
        if IN_CI and not path.exists():
            pytest.fail(f"golden file {path} is missing; generate it with SPARSECC_UPDATE_GOLDEN=1")
        path.write_text(text)
    assert text == path.read_text(), f"output differs from golden {path} (SPARSECC_UPDATE_GOLDEN=1 to accept)"


@pytest.fixture
def golden():
    """The golden-file checker: ``golden(name, text)``."""
    return check_golden
