"""White-box attacks in pixel space: FGSM and PGD under L∞ and L2 (Goodfellow et al. 2015; Madry et al. 2018).

Images are (B, C, H, W) floats in [0, 1]; ``eps`` is in the same units (``4/255`` for L∞, ``0.5`` for L2
on a whole image). The model expects normalised inputs, so the normalisation is applied inside the
attacked function (``Normalized``): gradients and the eps ball live in pixel space, where the threat
model is defined, whatever mean/std the checkpoint was trained with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("linf", "l2")


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for x in [0, 1]: the function the attacks differentiate."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass(frozen=True)
class Attack:
    """One attack configuration. ``step_size`` None: 2.5·eps/steps (Madry et al.); FGSM takes one eps step."""

    name: str  # "fgsm" | "pgd"
    norm: str = "linf"  # "linf" | "l2"
    eps: float = 4 / 255
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self):
        if self.name not in ("fgsm", "pgd"):
            raise ValueError(f"attack must be 'fgsm' or 'pgd', got {self.name!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if not 0.0 <= self.eps <= 1.0 and self.norm == "linf":
            raise ValueError(f"L∞ eps is in pixel units [0, 1], got {self.eps}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    def describe(self) -> dict:
        d = asdict(self)
        d = {"attack": d.pop("name"), **d}
        if self.name == "fgsm":
            d.update(steps=1, step_size=self.eps, random_start=False)
        elif d["step_size"] is None:
            d["step_size"] = 2.5 * self.eps / max(self.steps, 1)
        return d


def _flat_norm(t: Tensor) -> Tensor:
    """Per-sample L2 norm, shaped (B, 1, 1, 1) for broadcasting."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _ascent_direction(grad: Tensor, norm: str) -> Tensor:
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta)).clamp(max=1.0)


def _loss_grad(model: nn.Module, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():  # callers may sit under no_grad; only the input gets a gradient
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad, logits.detach()


def fgsm(model: nn.Module, images: Tensor, labels: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """One step of size ``eps`` up the loss gradient (its sign for L∞, its direction for L2), clipped to [0, 1].

    ``model`` takes pixel-space images (wrap a classifier in ``Normalized``)."""
    if eps == 0:
        return images.clone()
    grad, _ = _loss_grad(model, images, labels)
    return (images + eps * _ascent_direction(grad, norm)).clamp(0, 1).detach()


def pgd(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on the cross-entropy inside the ``eps`` ball around ``images`` and [0, 1].

    Starts from a uniform point in the ball when ``random_start``. A sample keeps the first iterate that
    is misclassified (later steps could wander back to the right class), otherwise the last one."""
    if eps == 0:
        return images.clone()
    alpha = 2.5 * eps / steps if step_size is None else step_size
    x0 = images.detach()
    delta = torch.zeros_like(x0)
    if random_start:
        if norm == "linf":
            delta = (torch.rand(x0.shape, generator=generator, device="cpu").to(x0) * 2 - 1) * eps
        else:
            direction = torch.randn(x0.shape, generator=generator, device="cpu").to(x0)
            radius = torch.rand((x0.shape[0],), generator=generator, device="cpu").to(x0)
            radius = radius.pow(1.0 / x0[0].numel()).view(-1, *([1] * (x0.dim() - 1)))
            delta = direction / _flat_norm(direction) * radius * eps
        delta = (x0 + delta).clamp(0, 1) - x0
    best = x0 + delta
    fooled = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    for _ in range(steps):
        grad, logits = _loss_grad(model, x0 + delta, labels)
        now_fooled = (logits.argmax(1) != labels) & ~fooled
        best[now_fooled] = (x0 + delta)[now_fooled]
        fooled |= now_fooled
        delta = _project(delta + alpha * _ascent_direction(grad, norm), eps, norm)
        delta = (x0 + delta).clamp(0, 1) - x0
    final = x0 + delta
    best[~fooled] = final[~fooled]
    return best.detach()


def run_attack(model: nn.Module, images: Tensor, labels: Tensor, attack: Attack,
               generator: torch.Generator | None = None) -> Tensor:
    """Adversarial images for one ``Attack`` (``model`` takes pixel-space images)."""
    if attack.name == "fgsm":
        return fgsm(model, images, labels, attack.eps, attack.norm)
    return pgd(model, images, labels, attack.eps, attack.norm, attack.steps, attack.step_size,
               attack.random_start, generator)


def default_attacks(eps_linf: Sequence[float] = (1 / 255, 2 / 255, 4 / 255), eps_l2: Sequence[float] = (),
                    steps: int = 10, step_size: float | None = None, random_start: bool = True,
                    names: Sequence[str] = ("fgsm", "pgd")) -> list[Attack]:
    """Every named attack at every eps of each norm (``step_size`` is relative: a fraction of eps, or None)."""
    out = []
    for norm, eps_list in (("linf", eps_linf), ("l2", eps_l2)):
        for eps in eps_list:
            for name in names:
                size = None if step_size is None else step_size * eps
                out.append(Attack(name, norm, float(eps), steps, size, random_start))
    return out


class AdversarialMeter:
    """Accumulates, per attack, how many clean-correct samples stay correct under attack."""

    def __init__(self, attacks: Iterable[Attack]):
        self.attacks = list(attacks)
        self.samples = 0
        self.clean_correct = 0
        self.robust = [0] * len(self.attacks)  # clean-correct and still correct
        self.adv_correct = [0] * len(self.attacks)  # correct under attack, of all samples

    def update(self, model: nn.Module, images: Tensor, labels: Tensor, generator: torch.Generator | None = None):
        """``model`` takes pixel-space images; ``images`` (B, C, H, W) in [0, 1]."""
        with torch.no_grad():
            clean_ok = model(images).argmax(1) == labels
        self.samples += len(labels)
        self.clean_correct += int(clean_ok.sum())
        for i, attack in enumerate(self.attacks):
            adv = run_attack(model, images, labels, attack, generator)
            with torch.no_grad():
                ok = model(adv).argmax(1) == labels
            self.robust[i] += int((ok & clean_ok).sum())
            self.adv_correct[i] += int(ok.sum())

    def result(self) -> dict:
        rows = []
        for attack, robust, correct in zip(self.attacks, self.robust, self.adv_correct):
            rows.append({
                **attack.describe(),
                "robustness": 100.0 * robust / self.clean_correct if self.clean_correct else None,
                "accuracy": 100.0 * correct / self.samples if self.samples else None,
            })
        return {
            "samples": self.samples,
            "clean_correct": self.clean_correct,
            "clean_accuracy": 100.0 * self.clean_correct / self.samples if self.samples else None,
            "attacks": rows,
        }
